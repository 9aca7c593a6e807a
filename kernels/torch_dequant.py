"""A portable pure-PyTorch W{2,3,4,8}A16/A32 kernel: dequantize the weight per call, then one matmul.

Prepared layout (groups made contiguous so dequantization is one broadcast, never a gather):
  codes  uint8 [out, in]       codes with input columns sorted by group (perm applied when act-order regrouped)
  scales act dtype [out, G, 1]
  neg_zs act dtype [out, G, 1]  −zero·scale, so W = codes·scale + neg_zs is one fused multiply-add after the cast
  perm   int64 [in] or None    input columns in group order; x is permuted the same way before the matmul
Uneven groups (a row-parallel tensor-parallel shard of an act-order export holds parts of many groups) keep the
columns in place and gather each column's scale and zero per call (memory stays packed):
  codes  uint8 [out, in] in the original column order; scales, neg_zs act dtype [out, G]; g_idx int64 [in]
"""

from __future__ import annotations

from typing import Optional

import torch

from compress_export.core.result import QuantizedWeight
from compress_export.kernels.base import WEIGHT_ONLY, KernelRequest, LinearKernel, group_order, register_kernel, restore


@register_kernel("torch-dequant")
class TorchDequantKernel(LinearKernel):
    priority = 0
    invertible = True
    perm: Optional[torch.Tensor]  # input columns in group order (None: already contiguous, or uneven groups)
    g_idx: Optional[torch.Tensor]  # uneven groups only: each column's group, gathered per call

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if not req.act_dtype.is_floating_point:
            return False, f"activations must be floating point, got {req.act_dtype}"
        if req.bits > 8:
            return False, f"{req.bits}-bit weights are not integer codes"
        if req.act_bits != 16:
            return False, WEIGHT_ONLY
        if not req.groups_divide():
            return False, f"group size {req.group_size} does not divide in_features {req.in_features}"
        return True, ""

    def __init__(self, qw: QuantizedWeight, req: KernelRequest):
        super().__init__(qw, req)
        out_f, in_f = qw.shape
        self.scheme = qw.scheme
        self.exact = (qw.scales.to(torch.float16), qw.zeros.to(torch.int16))  # for quantized_weight()
        neg_zs = -qw.zeros.double() * qw.scales.double()
        if req.uneven_groups:
            self.perm, self.g_idx = None, qw.g_idx.long()
            self.codes = qw.codes.contiguous().to(torch.uint8)
            self.scales, self.neg_zs = qw.scales.to(req.act_dtype), neg_zs.to(req.act_dtype)
            return
        self.g_idx = None
        self.perm = group_order(qw)
        codes = qw.codes if self.perm is None else qw.codes[:, self.perm]
        G = qw.scales.shape[1]
        self.gs = in_f // G
        self.codes = codes.contiguous().to(torch.uint8)
        self.scales = qw.scales.to(req.act_dtype).view(out_f, G, 1).contiguous()
        self.neg_zs = neg_zs.to(req.act_dtype).view(out_f, G, 1).contiguous()

    def weight(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        if self.g_idx is not None:
            g = self.g_idx.to(self.codes.device)
            return torch.addcmul(self.neg_zs[:, g], self.codes.to(self.scales.dtype), self.scales[:, g])
        w = self.codes.view(out_f, -1, self.gs).to(self.scales.dtype)
        return torch.addcmul(self.neg_zs, w, self.scales).view(out_f, in_f)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm.to(x.device))
        return torch.matmul(x, self.weight().t())

    def quantized_weight(self) -> QuantizedWeight:
        if self.g_idx is not None:
            return QuantizedWeight(
                self.codes, self.exact[0].float(), self.exact[1].int(), self.g_idx.int(), self.scheme
            )
        return restore(self.codes, self.exact[0], self.exact[1], self.perm, self.scheme)

    def tensors(self) -> dict:
        t = {"codes": self.codes, "scales": self.scales, "neg_zs": self.neg_zs}
        return {**t, "g_idx": self.g_idx} if self.g_idx is not None else t
