"""AWQ pass: activation-aware per-channel scales folded into the layer, then a clip search, per decoder layer.

Layer-wise: every mapping's input statistics are gathered from the unquantized layer in one forward, the scales
are searched and folded mapping by mapping (in layer order, as the reference does), the statistics are rescaled
to the folded inputs, and only then is each linear quantized. The pipeline's propagation forward then feeds the
compressed layer's outputs to the next layer.
"""

from __future__ import annotations

import logging
import re

import torch

from compress_export.core.errors import UserError
from compress_export.core.structure import AWQ_MAPPINGS, AWQ_NO_CLIP, ScaleMapping
from compress_export.math.hessian import HessianAccumulator
from compress_export.math.quant import group_params, quantize_with_params, weighted_group_params
from compress_export.math.scaling import fold_scale, search_scale
from compress_export.passes.base import Pass, register_pass, split_rows

log = logging.getLogger(__name__)

# AWQ's clip search: shrink each group's range by up to 50% in 2.5% steps (reference: max_shrink 0.5)
CLIP_RATIOS = 1.0 - torch.arange(0, 20) * 0.025


class AWQStats(HessianAccumulator):
    """The Hessian (for the objective) plus mean |x| per input channel (for the scale candidates)."""

    def __init__(self, in_features: int):
        super().__init__(in_features)
        self.absmean = torch.zeros(in_features)

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        m = x2.shape[0]
        if m:
            self.absmean = self.absmean.to(x2.device)
            total = self.n + m
            self.absmean.mul_(self.n / total).add_(x2.abs().sum(dim=0), alpha=1.0 / total)
        super().add(x2)

    def _merge(self, sum_, share: float, device) -> None:
        self.absmean = sum_(self.absmean.to(device).mul_(share))
        super()._merge(sum_, share, device)

    def scale_inputs(self, s: torch.Tensor) -> None:
        super().scale_inputs(s)
        self.absmean.div_(s.float())


@register_pass("awq")
class AWQPass(Pass):
    uses_act_order = False
    layer_wise = True
    scheme_defaults = {"symmetric": False}
    no_clip = AWQ_NO_CLIP  # linears (local names) whose ranges are kept min-max; None clips every linear
    _blocks: dict = {}  # inspected block name → its recorded calls (block scoring), for the layer being prepared

    def check_layout(self, layout, model_type: str) -> None:
        if model_type not in AWQ_MAPPINGS:
            raise UserError(
                f"--method awq has no scale mappings for model_type {model_type!r}; supported: "
                f"{', '.join(sorted(AWQ_MAPPINGS))} (use --method gptq or rtn for others)"
            )
        self.mappings = AWQ_MAPPINGS[model_type]
        self.mappings_named = {m.smooth for m in self.mappings}  # the per-expert ones are templates ("{e}")

    def make_stats(self, in_features):
        return AWQStats(in_features)

    def observe_layer(self, layer) -> list:
        """Block scoring: record each inspected block's inputs and output during the statistics forward."""
        self._blocks = {}
        if self.options.awq_score != "block":
            return []
        mods = dict(layer.named_modules())
        handles = []
        for name in {m.inspect for m in self.mappings if m.inspect and m.inspect in mods}:
            calls = self._blocks.setdefault(name, [])

            def hook(mod, args, kwargs, out, calls=calls):
                calls.append((args, dict(kwargs), _first(out).detach()))

            handles.append(mods[name].register_forward_hook(hook, with_kwargs=True))
        return handles

    def prepare_layer(self, layer, members, stats, where: str, sum_over_ranks=None) -> None:
        group_of = {n: gi for gi, names in enumerate(members) for n in names}
        mods = dict(layer.named_modules())
        for m in _per_expert(self.mappings, mods):
            if m.smooth not in self.mappings_named and not any(b in group_of for b in m.balance):
                continue  # an expert no calibration token reached: compressed without data (Pass.for_unseen)
            if m.optional and any(n not in mods for n in (m.smooth, *m.balance)):
                continue
            smooth, bal = _mapping_modules(m, mods, where)
            if smooth is None:
                continue
            gids = {group_of.get(b) for b in m.balance}
            if len(gids) != 1 or None in gids:
                raise UserError(
                    f"{where}: {', '.join(m.balance)} do not read the same input; AWQ cannot scale them together"
                )
            shared = stats[gids.pop()]  # the balanced linears' common input statistics
            W = torch.cat([b.weight.float() for b in bal], dim=0)
            calls = self._blocks.get(m.inspect) if m.inspect else None
            loss_of = _block_loss(mods[m.inspect], bal, calls) if calls else None
            s, loss, base = search_scale(
                W,
                shared.H,
                shared.absmean,
                self.scheme,
                loss_of=loss_of,
                reduce_sum=sum_over_ranks if loss_of else None,
            )
            fold_scale(smooth, bal, s)
            shared.scale_inputs(s)
            log.debug("%s%s: scaled %s, loss %.4g → %.4g", where, m.smooth, m.balance, base, loss)
        self._blocks = {}

    def compress_group(self, weights, stats, group):
        W = torch.cat([w.float() for w in weights], dim=0)
        scheme, opts = self.scheme, self.options
        gs = scheme.group_len(W.shape[1])
        scales, zeros = group_params(W, scheme.bits, scheme.symmetric, gs, search=False, min_zero=opts.min_zero)
        if opts.clip_search:
            clip = self._clipped_rows(group, [w.shape[0] for w in weights]).to(W.device)
            if clip.any():
                scales[clip], zeros[clip] = weighted_group_params(
                    W[clip], stats.H, scheme.bits, scheme.symmetric, gs, CLIP_RATIOS, opts.min_zero
                )
        qw = quantize_with_params(W, scales, zeros, scheme)
        return split_rows(qw, [w.shape[0] for w in weights])

    def _clipped_rows(self, group, rows: list) -> torch.Tensor:
        """A row mask over the group's concatenated linears: True where the clip search runs. The pattern
        matches each member's local name."""
        keep = [self.no_clip is None or not re.search(self.no_clip, m) for m in group.names]
        return torch.cat([torch.full((n,), k) for n, k in zip(rows, keep)])


def _per_expert(mappings, mods: dict):
    """The layer's mappings with each per-expert template ("mlp.experts.{e}.up_proj") expanded to every expert
    the layer holds, in expert order."""
    for m in mappings:
        if "{e}" not in m.smooth:
            yield m
            continue
        e = 0
        while m.smooth.format(e=e) in mods:
            yield ScaleMapping(m.smooth.format(e=e), tuple(b.format(e=e) for b in m.balance), m.when_shapes_match)
            e += 1


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _mapping_modules(m, mods: dict, where: str):
    """(smooth module, balance linears) of mapping m in this layer; (None, None) when a shape-conditional mapping
    does not apply (v_proj → o_proj under grouped-query attention)."""
    smooth, bal = mods.get(m.smooth), [mods.get(b) for b in m.balance]
    if smooth is None or None in bal:
        missing = [n for n in (m.smooth, *m.balance) if mods.get(n) is None]
        raise UserError(
            f"{where}: AWQ mapping {m.smooth} → {m.balance} does not fit this layer (no module {missing[0]})"
        )
    if any(b.in_features != smooth.weight.shape[0] for b in bal):
        if m.when_shapes_match:
            return None, None
        raise UserError(f"{where}: {m.smooth} output width does not match {m.balance} input width")
    return smooth, bal


def _block_loss(block, balance: list, calls: list):
    """loss_of(effective W) for search_scale: the squared error of `block`'s output over the recorded calls
    when the balance linears act with the rows of W (concatenated) and every other weight is as it is."""
    sizes = [b.weight.shape[0] for b in balance]

    @torch.no_grad()
    def loss_of(effective: torch.Tensor) -> float:
        originals = [b.weight.data for b in balance]
        try:
            for b, w in zip(balance, effective.split(sizes)):
                b.weight.data = w.to(b.weight.dtype)
            return sum(
                float((_first(block(*args, **kwargs)).float() - ref.float()).pow(2).sum())
                for args, kwargs, ref in calls
            )
        finally:
            for b, w in zip(balance, originals):
                b.weight.data = w

    return loss_of
