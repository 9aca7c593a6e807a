"""Asymmetric calibration (GPTAQ, Li et al. 2025): each linear is fitted to the original model's outputs, not to
those of the compressed prefix it sits behind.

GPTQ minimises ||X_q Wᵀ - X_q Qᵀ|| with X_q the inputs the compressed model gives the linear. The float model
computed X_fp Wᵀ instead, so the error the prefix let through stays. The asymmetric objective ||X_fp Wᵀ - X_q Qᵀ||
splits, because the least-squares solution V of ||X_fp Wᵀ - X_q Vᵀ|| leaves a residual orthogonal to X_q's span,
into a constant plus ||X_q Vᵀ - X_q Qᵀ||:

    V = W + W·D·H⁻¹,   D = (X_fp - X_q)ᵀ X_q,   H = X_qᵀ X_q   (both as the pass's running means, 2/n)

so GPTQ (or SparseGPT) run on the target V, with its own Hessian, minimise the asymmetric objective. GPTAQ folds
the same term into the column loop; solving for V once is the same optimum and leaves the sweep untouched. α
scales the step to V (GPTAQ's reference code weighs the term by α as well): V_α = W + α·W·D·H_d⁻¹, with H_d
dampened as the pass dampens it.

The original inputs X_fp come from a teacher stream run beside the pipeline's: the original layer i (a copy made
before the pass changes it) applied to the original model's hidden states. When the pass first sees a group of
linears sharing an input, a pre-hook runs the original layer on the same calibration chunk, once per chunk, keeping every leader's input until that leader's own hook takes it and the output as the
next layer's teacher input: one extra forward of each layer, and memory of one chunk's activations.

Skipped, with GPTQ's usual target: linears whose statistics are not a Hessian (RTN, AWQ), MoE expert linears (the
teacher's router sends other tokens to them, so there is no row-by-row X_fp). Under torchrun each rank runs both
streams on its own samples and the cross terms are merged over the ranks like the Hessians.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch

from compress_export.core.moe import expert_index
from compress_export.modifiers.base import Modifier, PlanContext, RunContext, register_modifier
from compress_export.passes.sequential import probe_groups, run_layer

DEFAULT_ALPHA = 0.5  # chosen on a dev split: benchmarks/README.md, "Asymmetric calibration"


class _Stop(Exception):
    pass


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, alpha: float, damp: float) -> torch.Tensor:
    """V = W + α·W·D·(H + λI)⁻¹ (float32 [out, in]). W: [out, in]; H, D: [in, in] as the pass accumulates them
    (H = 2/n·X_qᵀX_q, D = 2/n·(X_fp - X_q)ᵀX_q); λ = damp·mean(diag H). Columns no token fired stay W's."""
    H = H.double()
    dead = torch.diag(H) == 0
    Hd = H.clone()
    Hd[dead, dead] = 1.0
    Hd += damp * torch.diag(Hd).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    step = torch.linalg.solve(Hd, (W.double() @ D.double()).t()).t()  # Hd symmetric: (W D Hd⁻¹)ᵀ = Hd⁻¹ (W D)ᵀ
    step[:, dead] = 0
    return (W.double() + alpha * step).float()


class _Cross:
    """Running mean of 2·(x_fp - x_q)ᵀ x_q over token rows, kept like the pass's Hessian (HessianAccumulator)."""

    def __init__(self):
        self.D: Optional[torch.Tensor] = None
        self.n = 0

    def add(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        a = x_fp.reshape(-1, x_fp.shape[-1]).float()
        b = x_q.reshape(-1, x_q.shape[-1]).float()
        m = b.shape[0]
        if self.D is None:
            self.D = torch.zeros(b.shape[1], b.shape[1], dtype=torch.float32, device=b.device)
        total = self.n + m
        self.D.addmm_((a - b).t(), b, beta=self.n / total, alpha=2.0 / total)
        self.n = total

    def all_reduce_(self, sum_) -> None:
        """Every rank's running mean weighted by its share of the rows, summed (as HessianAccumulator merges)."""
        total = int(sum_(torch.tensor([float(self.n)], dtype=torch.float64)).item())
        if self.D is not None:
            sum_(self.D.mul_(self.n / total))
        self.n = total


@register_modifier("asymmetric")
class Asymmetric(Modifier):
    """GPTAQ's asymmetric calibration for Hessian passes (see the module's text)."""

    needs_calibration = False  # it acts only where the pass calibrates

    def __init__(self, alpha: float, damp: float):
        self.alpha, self.damp = alpha, damp
        self._teacher_in: Optional[list] = None
        self._original = None
        self._cross: Dict[str, _Cross] = {}
        self._hooks: list = []
        self._teacher_out: list = []
        self._pending: dict = {}  # (leader, chunk) → the original layer's input to that leader
        self._kwargs: Optional[list] = None
        self.applied = 0

    @classmethod
    def plan(cls, config, ctx: PlanContext) -> Optional[Asymmetric]:
        alpha = config.asymmetric if config.asymmetric is not None else DEFAULT_ALPHA
        if not alpha or ctx.method not in ("gptq", "sparsegpt"):
            return None
        return cls(alpha, config.damp)

    def before_pass(self, ctx: RunContext) -> None:
        self._teacher_in, self.applied = None, 0

    @torch.no_grad()
    def before_layer(self, ctx: RunContext, index: int, layer, states: Optional[list]) -> None:
        if states is None:
            return
        if self._teacher_in is None:  # layer 0: both streams start from the same embeddings
            self._teacher_in = [h for h, _ in states]
        self._original = copy.deepcopy(layer)  # before the pass changes it in place
        self._kwargs = [kw for _, kw in states]
        self._teacher_out, self._pending = [], {}
        linears = [(n, m) for n, m in ctx.layout.linears[index] if expert_index(n) < 0]
        h0, kw0 = states[0]
        leaders = [g[0] for g in probe_groups(layer, linears, h0, kw0)]
        mods = dict(ctx.layout.linears[index])
        self._cross = {n: _Cross() for n in leaders}
        self._hooks = [mods[n].register_forward_pre_hook(self._hook(n)) for n in leaders]

    def _hook(self, name: str):
        chunk = [0]

        def hook(mod, args):
            x, j = args[0], chunk[0]
            if name not in self._cross or j >= len(self._teacher_in):
                return  # compressed already (a propagation forward), or past the last chunk
            if x.shape[:-1] != self._teacher_in[j].shape[:-1]:
                return  # the pipeline's probe forward on one sample, not a calibration chunk
            if len(self._teacher_out) <= j:
                self._run_teacher(j)
            self._cross[name].add(self._pending.pop((name, j)), x)
            chunk[0] += 1

        return hook

    @torch.no_grad()
    def _run_teacher(self, j: int) -> None:
        """The original layer on the original model's chunk j, once: every leader's input is kept until its own
        hook takes it (within the same chunk), the output becomes the next layer's teacher input."""

        def grab(name):
            return lambda mod, args: self._pending.__setitem__((name, j), args[0])

        handles = [self._original.get_submodule(n).register_forward_pre_hook(grab(n)) for n in self._cross]
        try:
            self._teacher_out.append(run_layer(self._original, self._teacher_in[j], self._kwargs[j]))
        finally:
            for h in handles:
                h.remove()

    def before_compress(self, ctx: RunContext, groups) -> None:
        """Under torchrun, on every rank: each group's cross term merged over the ranks' tokens, as the pass's
        Hessian was (each rank runs both streams on its own samples)."""
        if ctx.dist.active:
            for names in groups:
                if names[0] in self._cross:
                    self._cross[names[0]].all_reduce_(ctx.dist.sum_)

    def target_weights(self, ctx: RunContext, names, weights, stats) -> Optional[list]:
        cross = self._cross.pop(names[0], None)
        if cross is None or cross.D is None or not hasattr(stats, "H") or cross.n != getattr(stats, "n", -1):
            return None
        W = torch.cat([w.float() for w in weights], dim=0)
        V = asymmetric_target(W, stats.H, cross.D, self.alpha, self.damp)
        self.applied += len(names)
        return list(V.split([w.shape[0] for w in weights], dim=0))

    @torch.no_grad()
    def refine_layer(self, ctx: RunContext, index: int, layer, results: dict) -> bool:
        """The teacher stream moves on through the original layer i (before anything else changes)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._cross, self._pending = [], {}, {}
        if self._original is not None:
            for j in range(len(self._teacher_out), len(self._teacher_in)):  # chunks no hook ran the teacher on
                self._run_teacher(j)
            self._teacher_in, self._teacher_out = self._teacher_out, []
            self._original = self._kwargs = None
        return False

    def at_export(self, ctx: RunContext, folder, extra: dict) -> None:
        if self.applied:
            extra["asymmetric_calibration"] = {"alpha": self.alpha, "linears": self.applied}

    def summary(self) -> dict:
        if not self.applied:
            return {}
        return {"asymmetric": f"α {self.alpha}, {self.applied} linears fitted to the original model's outputs"}
