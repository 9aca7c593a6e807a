"""Pruning passes: magnitude, Wanda and SparseGPT, N:M or unstructured, optionally joint with quantization.

Each produces a SparseWeight (values with exact zeros and the keep mask) or, with a scheme (--bits), a
QuantizedWeight whose pruned codes equal their zero point. The masks all come from sparsity.mask_for; SparseGPT
runs the GPTQ sweep with pruning (sweep.py) on the shared Hessian core.
"""

from __future__ import annotations

import torch

from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.sparsity import mask_for
from compress_export.math.quant import rtn_quantize
from compress_export.passes.base import Pass, register_pass, split_rows
from compress_export.passes.gptq_pass import GPTQPass


class ColumnNorms:
    """Σ x_j² per input channel over every token: Wanda's ‖X_j‖₂², without a full Hessian."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        self.sq = self.sq.to(x.device) + x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0).double()

    def all_reduce_(self, sum_, device) -> None:
        """Distributed calibration: the sums of every rank's rows (sum_(t) sums t in place over the ranks)."""
        self.sq = sum_(self.sq.to(device))


class PruningPass(Pass):
    uses_act_order = False
    prunes = True

    def scores(self, W: torch.Tensor, stats) -> torch.Tensor:
        raise NotImplementedError

    def compress_group(self, weights, stats, group):
        W = torch.cat([w.float() for w in weights], dim=0)
        mask = mask_for(self.scores(W, stats), self.sparsity)
        return split_rows(_finish(W * mask, mask, self), [w.shape[0] for w in weights])


def _finish(W: torch.Tensor, mask: torch.Tensor, p: Pass):
    """Pruned weights as a SparseWeight, or quantized (round to nearest) with pruned codes at their zero point."""
    if p.scheme is None:
        return SparseWeight(W, mask, p.sparsity)
    qw = rtn_quantize(W, p.scheme, clip_search=p.options.clip_search, min_zero=p.options.min_zero)
    z = qw.zeros[:, qw.g_idx.long()].to(torch.uint8)
    codes = torch.where(mask, qw.codes, z)
    return QuantizedWeight(codes, qw.scales, qw.zeros, qw.g_idx, qw.scheme, mask=mask)


@register_pass("magnitude")
class MagnitudePass(PruningPass):
    needs_calibration = False

    def scores(self, W, stats):
        return W.abs()


@register_pass("wanda")
class WandaPass(PruningPass):
    """Sun et al. 2023: |W_ij|·‖X_j‖₂, compared within each output row (per N:M group when structured)."""

    def make_stats(self, in_features):
        return ColumnNorms(in_features)

    def scores(self, W, stats):
        return W.abs() * stats.sq.sqrt().float()[None, :]


@register_pass("sparsegpt")
class SparseGPTPass(GPTQPass):
    """Frantar & Alistarh 2023: GPTQ's sweep with the mask chosen by w²/[H⁻¹]²_jj (per 4 columns for 2:4, per
    block when unstructured) and the remaining weights updated to compensate; quantizes too when given a scheme."""

    uses_act_order = False
    prunes = True
