"""Checkpoint formats: each packs the in-memory QuantizedWeight and writes what an engine reads.

Importing this package registers every built-in format.
"""
from .base import FORMATS, Format, format_for_config, register_format  # noqa: F401
from . import gptq  # noqa: F401  (registers "gptq")
from . import awq  # noqa: F401,E402  (registers "awq")
from . import compressed_tensors  # noqa: F401,E402  (registers "compressed-tensors")
from . import sparse  # noqa: F401,E402  (registers "sparse24" and "dense")
