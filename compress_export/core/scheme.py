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
PER_CHANNEL = -1  # the group_size of one group per output channel, as GPTQ configs (and so engines) store it


def group_len(group_size: int, in_features: int) -> int:
    """Input columns per group for a stored group_size: -1 (per output channel) is one group of every column.
    The one place that reads -1; everything else asks a Scheme (or this, for a bare group_size)."""
    return in_features if group_size == PER_CHANNEL else group_size


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
        if self.group_size < PER_CHANNEL:
            raise UserError(f"--group-size {self.group_size} must be positive or -1 (per output channel)")
        if self.act_order not in ACT_ORDERS:
            raise UserError(f"--act-order {self.act_order!r}: choose one of {ACT_ORDERS}")
        if self.act_bits not in (8, 16):
            raise UserError(f"activation bits {self.act_bits}: choose 16 (weight-only) or 8 (--scheme W8A8)")
        if self.act_bits == 8 and not (self.bits == 8 and self.per_channel and self.symmetric):
            raise UserError(
                "8-bit activations (--scheme W8A8) need 8-bit symmetric weights with one scale per "
                f"output channel, what engines' int8 kernels run; got --bits {self.bits} --group-size "
                f"{self.group_size}{'' if self.symmetric else ' --asym'} (drop those flags)"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of a symmetric scheme (codes are offset-binary)."""
        return 1 << (self.bits - 1)

    @property
    def per_channel(self) -> bool:
        """One group spanning every input column: group_size -1, the value configs store for per-channel."""
        return self.group_size == PER_CHANNEL

    def group_len(self, in_features: int) -> int:
        """Input columns per group (all of them when per-channel)."""
        return group_len(self.group_size, in_features)

    def groups(self, in_features: int) -> int:
        """Groups of a linear with `in_features` inputs (1 when per-channel)."""
        return 1 if self.per_channel else in_features // max(1, self.group_size)

    def divides(self, in_features: int) -> bool:
        """Whether the groups tile `in_features` inputs exactly (always when per-channel)."""
        return self.per_channel or in_features % self.group_size == 0

    def with_(self, **kw) -> Scheme:
        return replace(self, **kw)


PRESETS = {
    "W8A16": Scheme(bits=8, group_size=-1),
    "W8A8": Scheme(bits=8, group_size=-1, act_bits=8),
    "W4A16": Scheme(bits=4, group_size=128),
    "W4A16_ASYM": Scheme(bits=4, group_size=128, symmetric=False),
    "W3A16": Scheme(bits=3, group_size=128),
    "W2A16": Scheme(bits=2, group_size=64),
}
