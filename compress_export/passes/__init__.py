"""Layer 5, passes: compression algorithms. Each produces one in-memory result per linear; the ordering and
hooks live here (sequential), the math below. Importing the package registers every built-in pass.
"""

from compress_export.passes import awq_pass, gptq_pass, pruning, rtn_pass  # noqa: F401
from compress_export.passes.base import (  # noqa: F401
    AWQ_SCORES,
    PASSES,
    LinearGroup,
    Pass,
    PassOptions,
    default_scheme,
    register_pass,
)
