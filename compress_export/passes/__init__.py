"""Compression passes (algorithms). Importing this package registers every built-in pass."""
from .base import AWQ_SCORES, PASSES, LinearGroup, Pass, PassOptions, default_scheme, register_pass  # noqa: F401
from . import awq_pass, gptq_pass, pruning, rtn_pass  # noqa: F401
