"""GPTQ pass: one Hessian per distinct linear input, linears sharing it quantized in one sweep."""

from __future__ import annotations

import torch

from compress_export.math.hessian import HessianAccumulator
from compress_export.math.sweep import gptq_quantize
from compress_export.passes.base import Pass, register_pass, split_rows


@register_pass("gptq")
class GPTQPass(Pass):
    def make_stats(self, in_features):
        return HessianAccumulator(in_features)

    def compress_group(self, weights, stats, group):
        W = torch.cat([w.float() for w in weights], dim=0)
        o = self.options
        qw = gptq_quantize(
            W,
            stats.H,
            self.scheme_for(group),
            damp=o.damp,
            block_size=o.block_size,
            clip_search=o.clip_search,
            min_zero=o.min_zero,
            sparsity=self.sparsity,
            name=group.label,
            record_offsets=o.record_offsets,
        )
        return split_rows(qw, [w.shape[0] for w in weights])
