"""Compression passes (algorithms). Importing this package registers every built-in pass."""
from .base import PASSES, LinearGroup, Pass, PassOptions, register_pass  # noqa: F401
from . import awq, gptq, rtn, sparse  # noqa: F401
