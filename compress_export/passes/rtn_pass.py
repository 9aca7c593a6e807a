"""RTN: round-to-nearest with min-max group scales. No calibration; the baseline every pass must beat."""

from __future__ import annotations

import torch

from compress_export.math.quant import rtn_quantize
from compress_export.passes.base import Pass, register_pass, split_rows


@register_pass("rtn")
class RTNPass(Pass):
    needs_calibration = False
    uses_act_order = False

    def compress_group(self, weights, stats, group):
        W = torch.cat([w.float() for w in weights], dim=0)
        # RTN is the plain baseline: min-max, no clip search, unless asked for explicitly.
        qw = rtn_quantize(W, self.scheme_for(group), clip_search=False, min_zero=self.options.min_zero)
        return split_rows(qw, [w.shape[0] for w in weights])
