"""The one in-memory result every pass produces and every format packs.

Formats only pack and unpack it; kernels only run it. Layouts here are the plain, unpacked ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from compress_export.core.scheme import Scheme


@dataclass
class QuantizedWeight:
    """A linear layer's weight W[out, in] as integer codes and per-group parameters.

    codes:  uint8 [out, in], values in [0, 2^bits - 1], in the original column order.
    scales: float32 [out, groups]; exactly representable in fp16 (passes round them), so every format
            that stores fp16 scales reproduces the same numbers.
    zeros:  int32 [out, groups], the zero point in code units ((2^(bits-1)) everywhere when symmetric).
    g_idx:  int32 [in], the group of each input column (i // group_size unless act-order regrouped them).
    bias:   optional float tensor [out], carried through unchanged.
    mask:   optional bool [out, in], True where a weight is kept (pruned codes equal their zero point, so they
            dequantize to exactly 0).
    lora_a, lora_b: optional float32 [rank, in] and [out, rank], the low-rank correction of the compression error
            (lowrank.py): the layer acts with dequantize() + lora_b @ lora_a.
    offsets: optional float32 [out, in], in code units, in [-1/2, 1/2]: where the weight GPTQ rounded sat relative
            to its code (its error-updated value / scale + zero - code). Transient: recovery (modifiers/recover.py)
            starts its rounding offsets there; no format stores it.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    scheme: Scheme
    bias: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return tuple(self.codes.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.has_trivial_g_idx():  # contiguous groups: broadcast over a [out, G, gs] view, no [out, in] gathers
            out_f, n = self.codes.shape
            w = self.codes.float().view(out_f, self.scales.shape[1], -1)
            w.sub_(self.zeros.float()[..., None]).mul_(self.scales.float()[..., None])
            return w.view(out_f, n).to(dtype)
        g = self.g_idx.long()
        scale = self.scales.float()[:, g]
        zero = self.zeros.float()[:, g]
        return ((self.codes.float() - zero) * scale).to(dtype)

    def to(self, device) -> QuantizedWeight:
        return _moved(self, device)

    def has_trivial_g_idx(self) -> bool:
        n = self.codes.shape[1]
        ref = torch.arange(n, dtype=torch.int32) // self.scheme.group_len(n)
        return bool(torch.equal(self.g_idx.cpu().int(), ref))


@dataclass
class SparseWeight:
    """A pruned, unquantized weight: values float32 [out, in] with exact zeros where mask [out, in] is False.
    lora_a / lora_b: as in QuantizedWeight."""

    values: torch.Tensor
    mask: torch.Tensor
    sparsity: object  # compress_export.core.sparsity.Sparsity
    bias: Optional[torch.Tensor] = None
    scheme: None = None
    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return tuple(self.values.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.values.to(dtype)

    def to(self, device) -> SparseWeight:
        return _moved(self, device)


def stored_as(result, dtype):
    """The result with its float values rounded to the dtype the export stores them in (a SparseWeight's kept
    values; codes and scales are already exact), so the layer, later layers' calibration and the file hold the
    same numbers. dtype None: left as it is. Returns the result, changed in place."""
    if isinstance(result, SparseWeight) and dtype is not None:
        result.values = result.values.to(dtype).to(result.values.dtype)
    return result


def corrected(result, dtype=torch.float32) -> torch.Tensor:
    """The weight a layer acts with: the dequantized result plus its low-rank correction, if any."""
    w = result.dequantize(torch.float32)
    if result.lora_a is not None:
        w = w + result.lora_b.float() @ result.lora_a.float()
    return w.to(dtype)


def _moved(result, device):
    """The same result with every tensor on `device` (passes run on the layer's device; formats pack on the CPU)."""
    return replace(
        result,
        **{
            f.name: getattr(result, f.name).to(device)
            for f in fields(result)
            if torch.is_tensor(getattr(result, f.name))
        },
    )
