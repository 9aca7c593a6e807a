"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

Per mapping (a norm and the linears that read its output: structure.SMOOTH_MAPPINGS) and input channel j:
    s_j = max|X_j|^α / max_i |W_ij|^(1−α)
The norm is divided by s and the linears' input columns multiplied by it (scaling.fold_scale, AWQ's fold), so
the layer computes the same function while the engine's per-token int8 activation quantizer sees channels of
flatter range; α sets how much of the difficulty moves to the weights (0.5 in the paper for most models).
It runs on each decoder layer's calibration inputs before the weight pass (RTN or GPTQ) sees the layer: the
`smoothquant` modifier (its before_layer hook; modifiers/base.py), planned from the config's `smoothquant` α.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from compress_export.core.errors import UserError
from compress_export.core.structure import SMOOTH_MAPPINGS, ScaleMapping
from compress_export.math.scaling import fold_scale
from compress_export.modifiers.base import Modifier, PlanContext, RunContext, register_modifier
from compress_export.passes.sequential import run_layer

SMOOTH_METHODS = ("rtn", "gptq")
# On by default for W8A8 where it applies (RTN/GPTQ on a model with mappings): on SmolLM2 it lowers perplexity for
# both passes, in our loader and in vLLM (benchmarks/w8a8.py). 0 turns it off.
DEFAULT_ALPHA = 0.5


def smooth_scales(act_absmax: torch.Tensor, weights: List[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] from the per-channel max |x| [in] and the balance weights [rows, in] that read x."""
    w_absmax = torch.cat([w.float() for w in weights], dim=0).abs().amax(dim=0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@dataclass(frozen=True)
class Smoothing:
    alpha: float
    mappings: Tuple[ScaleMapping, ...]

    @classmethod
    def plan(cls, alpha, scheme, method: str, model_type: str):
        """The plan, or None when off: alpha 0, or alpha None (the default) where SmoothQuant does not apply (it is
        then DEFAULT_ALPHA for W8A8 with RTN or GPTQ on a model with mappings). An explicit alpha that does not fit
        the scheme, pass or model is a UserError naming why."""
        if alpha is None:
            applies = (
                scheme is not None
                and scheme.act_bits == 8
                and method in SMOOTH_METHODS
                and model_type in SMOOTH_MAPPINGS
            )
            alpha = DEFAULT_ALPHA if applies else 0
        if alpha == 0:
            return None
        if not 0 <= alpha <= 1:
            raise UserError(f"--smoothquant {alpha}: α must be between 0 and 1 (0.5 suits most models)")
        if scheme is None or scheme.act_bits != 8:
            raise UserError(
                "--smoothquant prepares 8-bit activations: use it with --scheme W8A8 (weight-only "
                "schemes gain nothing from it)"
            )
        if method not in SMOOTH_METHODS:
            raise UserError(f"--smoothquant runs before --method {' or '.join(SMOOTH_METHODS)}, not {method}")
        if model_type not in SMOOTH_MAPPINGS:
            raise UserError(
                f"--smoothquant has no mappings for model_type {model_type!r}; supported: "
                f"{', '.join(sorted(SMOOTH_MAPPINGS))}"
            )
        return cls(float(alpha), SMOOTH_MAPPINGS[model_type])

    @torch.no_grad()
    def apply(self, layer: torch.nn.Module, states: list, reduce_max=None) -> None:
        """Measure max |x| at each mapping's input over every calibration batch `states` [(hidden, kwargs)],
        merge it over ranks (reduce_max), and fold the scales into the layer."""
        mods = dict(layer.named_modules())
        ranges, hooks = {}, []
        for m in self.mappings:
            first = mods.get(m.balance[0])
            if first is None or mods.get(m.smooth) is None:
                raise UserError(f"SmoothQuant mapping {m.smooth} → {m.balance} does not fit this layer")

            def hook(mod, args, key=m.smooth):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
                ranges[key] = x if key not in ranges else torch.maximum(ranges[key], x)

            hooks.append(first.register_forward_pre_hook(hook))
        try:
            for hidden, kw in states:
                run_layer(layer, hidden, kw)
        finally:
            for h in hooks:
                h.remove()
        for m in self.mappings:
            act = ranges[m.smooth]
            if reduce_max is not None:
                act = reduce_max(act)
            balance = [mods[b] for b in m.balance]
            fold_scale(mods[m.smooth], balance, smooth_scales(act, [b.weight for b in balance], self.alpha))


@register_modifier("smoothquant")
class SmoothQuant(Modifier):
    """SmoothQuant as a modifier: folded into each decoder layer before the weight pass, on its calibration
    inputs (so the run calibrates even for RTN); recorded as `smoothquant: α` in the export's quantization_config."""

    order = 10

    needs_calibration = True

    def __init__(self, smoothing: Smoothing):
        self.smoothing = smoothing

    @property
    def alpha(self) -> float:
        return self.smoothing.alpha

    @classmethod
    def plan(cls, config, ctx: PlanContext):
        s = Smoothing.plan(config.smoothquant, ctx.scheme, ctx.method, ctx.model_type)
        return None if s is None else cls(s)

    def before_layer(self, ctx: RunContext, index: int, layer, states) -> None:
        if states is not None:
            self.smoothing.apply(layer, states, ctx.dist.max_ if ctx.dist.active else None)

    def at_export(self, ctx: RunContext, folder, extra: dict) -> None:
        extra["smoothquant"] = self.alpha

    def summary(self) -> dict:
        return {"smoothquant": self.alpha}
