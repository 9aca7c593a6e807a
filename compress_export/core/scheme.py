"""Frozen quantization schemes: what the numbers are, not how they are found or written.

Options of the algorithm (dampening, clip search) live with the pass; output options with the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from compress_export.core.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
# "none": natural column order. "static": GPTQ visits columns by descending Hessian diagonal but groups
# stay contiguous (params fixed before the pass), so no g_idx is needed. "group": groups are formed in
# visiting order, recorded per input column in g_idx (GPTQ's desc_act=True).
ACT_ORDERS = ("none", "static", "group")


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel; 0: auto (128, else 64, else 32 if they divide)
    symmetric: bool = True
    act_order: str = "none"
    # Activations: 16 = left in the serving dtype (weight-only); 8 = int8, per token, dynamic and symmetric,
    # quantized by the engine at run time (W8A8: vLLM's own int8 kernels, oneDNN on CPU, CUTLASS on GPU).
    act_bits: int = 16

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits {self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size < -1:
            raise UserError(f"--group-size {self.group_size} must be positive or -1 (per output channel)")
        if self.act_order not in ACT_ORDERS:
            raise UserError(f"--act-order {self.act_order!r}: choose one of {ACT_ORDERS}")
        if self.act_bits not in (8, 16):
            raise UserError(f"activation bits {self.act_bits}: choose 16 (weight-only) or 8 (--scheme W8A8)")
        if self.act_bits == 8 and (self.bits, self.group_size, self.symmetric) != (8, -1, True):
            raise UserError("8-bit activations (--scheme W8A8) need 8-bit symmetric weights with one scale per "
                            f"output channel, what engines' int8 kernels run; got --bits {self.bits} --group-size "
                            f"{self.group_size}{'' if self.symmetric else ' --asym'} (drop those flags)")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of a symmetric scheme (codes are offset-binary)."""
        return 1 << (self.bits - 1)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def with_(self, **kw) -> "Scheme":
        return replace(self, **kw)


PRESETS = {
    "W8A16": Scheme(bits=8, group_size=-1),
    "W8A8": Scheme(bits=8, group_size=-1, act_bits=8),
    "W4A16": Scheme(bits=4, group_size=128),
    "W4A16_ASYM": Scheme(bits=4, group_size=128, symmetric=False),
    "W3A16": Scheme(bits=3, group_size=128),
    "W2A16": Scheme(bits=2, group_size=64),
}
