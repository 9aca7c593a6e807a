"""Kernel interface and registry: a kernel only runs a QuantizedWeight, whatever format it was read from.

Kernels declare what they can run (`can_implement(request) -> (ok, reason)`) and are tried in priority order;
when none fits, every kernel's reason is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from compress_export.core.errors import UserError
from compress_export.core.registry import Registry
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import PER_CHANNEL, group_len

KERNELS: Registry = Registry(
    "kernel",
    builtins=[
        f"compress_export.kernels.{m}"
        for m in ("torch_dequant", "dense", "cpu_wna16", "cuda_wna16", "int8", "cpu_sparse24")
    ],
)
WEIGHT_ONLY = "weight-only: keeps activations in float, and this layer's scheme quantizes them to int8 (W8A8)"
register_kernel = KERNELS.register


@dataclass(frozen=True)
class KernelRequest:
    bits: int
    group_size: int  # as the scheme stores it: -1 per output channel (group_len reads it)
    symmetric: bool
    has_g_idx: bool  # act-order regrouped the input columns
    in_features: int
    out_features: int
    act_dtype: torch.dtype
    device: str  # "cpu", "cuda", ...
    sparsity: str = ""  # "2:4" when every group of 4 inputs keeps 2 (pruned weights), else ""
    # act-order groups that are not runs of group_size columns once sorted: a row-parallel tensor-parallel shard
    # of an act-order export holds a part of many groups. Only kernels that gather per column can run it.
    uneven_groups: bool = False
    act_bits: int = 16  # 8: the layer's activations are quantized to int8 per token at run time (W8A8)

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    @property
    def group_len(self) -> int:
        """Input columns per group (all of them when per-channel)."""
        return group_len(self.group_size, self.in_features)

    def groups_divide(self) -> bool:
        """Whether the groups tile the inputs exactly (always when per-channel)."""
        return self.per_channel or self.in_features % self.group_size == 0

    @classmethod
    def for_weight(cls, qw, act_dtype: torch.dtype, device: str) -> KernelRequest:
        """qw: a QuantizedWeight, or a SparseWeight (float weights: bits 16)."""
        sp = str(getattr(qw, "sparsity", "") or "")
        if isinstance(qw, SparseWeight):
            return cls(16, PER_CHANNEL, True, False, qw.shape[1], qw.shape[0], act_dtype, device, sp)
        s = qw.scheme
        if qw.mask is not None and not sp:
            sp = "2:4" if _is_24(qw.mask) else ""
        has_g_idx = not qw.has_trivial_g_idx()
        return cls(
            s.bits,
            s.group_size,
            s.symmetric,
            has_g_idx,
            qw.shape[1],
            qw.shape[0],
            act_dtype,
            device,
            sp,
            uneven_groups=has_g_idx and not _even_groups(qw),
            act_bits=s.act_bits,
        )


class LinearKernel:
    """Prepare once from a QuantizedWeight (its own layout), then run y = x Wᵀ (bias added by the caller)."""

    priority = 0
    # True: quantized_weight() gives back the exact codes, scales, zeros and g_idx it was prepared from, so a
    # loaded model saves the format's tensors unchanged without keeping them in memory.
    invertible = False

    @classmethod
    def can_implement(cls, req: KernelRequest) -> Tuple[bool, str]:
        raise NotImplementedError

    def __init__(self, qw: QuantizedWeight, req: KernelRequest):
        self.req = req

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict:
        """The prepared tensors, for modules that register them as buffers (device moves, memory accounting)."""
        return {}

    def quantized_weight(self) -> QuantizedWeight:
        """The QuantizedWeight this kernel was prepared from (invertible kernels only)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no exact copy of its weight")


def choose_kernel(req: KernelRequest) -> type:
    reasons = []
    for name, cls in sorted(KERNELS.items(), key=lambda kv: -kv[1].priority):
        ok, why = cls.can_implement(req)
        if ok:
            return cls
        reasons.append(f"{name}: {why}")
    raise UserError(f"no kernel can run {req}: " + "; ".join(reasons))


def group_order(qw: QuantizedWeight) -> Optional[torch.Tensor]:
    """The permutation that sorts input columns into contiguous groups (act-order), or None when they already are.
    Kernels run groups as contiguous runs of `group_size` columns, so a g_idx with groups of other sizes is refused
    here, by name, rather than run wrongly."""
    if qw.has_trivial_g_idx():
        return None
    if not _even_groups(qw):
        gs = qw.scheme.group_len(qw.shape[1])
        sizes = torch.bincount(qw.g_idx.long()).tolist()
        raise UserError(f"g_idx gives groups of {sorted(set(sizes))} columns; group size {gs} needs {gs} in each")
    return torch.argsort(qw.g_idx.long(), stable=True)


def _even_groups(qw: QuantizedWeight) -> bool:
    """Whether sorting the columns by group gives runs of exactly group_size columns, group after group."""
    in_f = qw.shape[1]
    gs = qw.scheme.group_len(in_f)
    g = qw.g_idx.long().cpu()
    return bool(torch.equal(torch.sort(g).values, torch.arange(in_f) // gs))


def restore(codes_sorted: torch.Tensor, scales, zeros, perm, scheme) -> QuantizedWeight:
    """Inverse of preparing with group_order: codes back in the original column order, g_idx rebuilt."""
    in_f = codes_sorted.shape[1]
    gs = scheme.group_len(in_f)
    g_sorted = (torch.arange(in_f) // gs).to(torch.int32)
    if perm is None:
        return QuantizedWeight(codes_sorted.to(torch.uint8), scales.float(), zeros.to(torch.int32), g_sorted, scheme)
    perm = perm.cpu()
    codes = torch.empty_like(codes_sorted, dtype=torch.uint8)
    codes[:, perm] = codes_sorted.to(torch.uint8)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = g_sorted
    return QuantizedWeight(codes, scales.float(), zeros.to(torch.int32), g_idx, scheme)


def _is_24(mask: torch.Tensor) -> bool:
    return mask.shape[1] % 4 == 0 and bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())
