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
before the pass changes it, after SmoothQuant smoothed it) applied to the original model's hidden states. A forward
of layer i counts as calibration only on one of the pipeline's own chunk tensors (by identity: not the pipeline's
one-sample probe, not another modifier's forwards on other tensors); a second sweep over the chunks before a group
is compressed (a modifier's forwards on layer 0's inputs, then the pass's) starts that group's term over. When a
group leader (the first of the linears sharing an input) sees chunk j, the original layer runs on the teacher's
chunk j once, keeping every leader's input until that leader's hook takes it, and its output becomes the next
layer's teacher input: one extra forward of each layer; memory of one chunk's leader inputs and a copy of one layer.

Skipped, with GPTQ's usual target: linears whose statistics are not a Hessian (RTN, AWQ), MoE expert linears (the
teacher's router sends other tokens to them) and any leader whose original input differs in shape from the
compressed one (inputs gathered by routing). Under torchrun each rank runs both streams on its own samples and the
cross terms are merged over the ranks like the Hessians. The low-rank correction (--lowrank-rank) fits V − Q.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch

from compress_export.core.errors import UserError
from compress_export.core.moe import expert_index
from compress_export.math.hessian import MAX_DAMP_RETRIES
from compress_export.modifiers.base import Modifier, PlanContext, RunContext, register_modifier
from compress_export.passes.sequential import probe_groups, run_layer

DEFAULT_ALPHA = 0.5  # chosen on a dev split: benchmarks/README.md, "Asymmetric calibration"


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, alpha: float, damp: float) -> torch.Tensor:
    """V = W + α·W·D·(H + λI)⁻¹ (float32 [out, in]). W: [out, in]; H, D: [in, in] as the pass accumulates them
    (H = 2/n·X_qᵀX_q, D = 2/n·(X_fp - X_q)ᵀX_q); λ = damp·mean(diag H), raised tenfold while H + λI is not
    positive definite (as the pass's inverse_cholesky does). A column no token fired has D's column 0: it stays W's.
    A float64 Cholesky solve: in float32 the same export scored 46.60 against 46.06 (SmolLM2 GPTQ W4 g64, eval.txt),
    the step is that sensitive to H's conditioning."""
    Hd = H.double()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    mean_diag = Hd.diagonal().mean().item()
    rhs = (W.double() @ D.double()).t()  # Hd symmetric: (W D Hd⁻¹)ᵀ = Hd⁻¹ (W D)ᵀ
    d = damp
    for _ in range(MAX_DAMP_RETRIES + 1):
        M = Hd.clone()
        M.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(M)
        del M
        if info.item() == 0:
            step = torch.cholesky_solve(rhs, L).t()
            if torch.isfinite(step).all():
                return (W.double() + alpha * step).float()
        d = d * 10 if d > 0 else 1e-4
    return W.float()  # hopeless H: the pass itself stops with its own message


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

    def all_reduce_(self, sum_, width: int) -> None:
        """Every rank's running mean weighted by its share of the rows, summed (as HessianAccumulator merges).
        Every rank calls the same collectives: a rank whose hook never fired sends zeros of width × width."""
        total = int(sum_(torch.tensor([float(self.n)], dtype=torch.float64)).item())
        if self.D is None:
            self.D = torch.zeros(width, width, dtype=torch.float32)
        sum_(self.D.mul_(self.n / total if total else 0.0))
        self.n = total


@register_modifier("asymmetric")
class Asymmetric(Modifier):
    """GPTAQ's asymmetric calibration for Hessian passes (see the module's text)."""

    needs_calibration = False  # it acts only where the pass calibrates

    order = 20  # after SmoothQuant (the original copied is the smoothed layer), before what trains results

    def __init__(self, alpha: float, damp: float):
        self.alpha, self.damp = alpha, damp
        self._teacher_in: Optional[list] = None
        self._original = None
        self._student_in: list = []  # the pipeline's calibration chunks of this layer (by identity)
        self._kwargs: list = []
        self._chunk: Optional[int] = None  # the chunk the layer is running now, None: not a calibration chunk
        self._cross: Dict[str, _Cross] = {}  # leader → its cross term, until before_compress decides
        self._seen: Dict[str, set] = {}  # leader → chunks in its cross term
        self._ready: Dict[str, _Cross] = {}  # leader → a cross term target_weights applies
        self._hooks: list = []
        self._teacher_out: Dict[int, torch.Tensor] = {}
        self._pending: dict = {}  # (leader, chunk) → the original layer's input to that leader
        self.applied = 0

    @classmethod
    def plan(cls, config, ctx: PlanContext) -> Optional[Asymmetric]:
        alpha = config.asymmetric if config.asymmetric is not None else DEFAULT_ALPHA
        if ctx.method not in ("gptq", "sparsegpt"):
            if alpha and config.asymmetric is not None:  # asked for by name: say why it cannot apply
                raise UserError(
                    f"--asymmetric fits the targets of gptq and sparsegpt, not {ctx.method}: drop it or add "
                    "--method gptq"
                )
            return None
        return cls(alpha, config.damp) if alpha else None

    def before_pass(self, ctx: RunContext) -> None:
        self._teacher_in, self.applied = None, 0

    @torch.no_grad()
    def before_layer(self, ctx: RunContext, index: int, layer, states: Optional[list]) -> None:
        if states is None:
            return
        if self._teacher_in is None:  # layer 0: both streams start from the same embeddings
            self._teacher_in = [h for h, _ in states]
        self._original = copy.deepcopy(layer)  # before the pass changes it in place
        self._student_in, self._kwargs = [h for h, _ in states], [kw for _, kw in states]
        self._teacher_out, self._pending, self._ready = {}, {}, {}
        linears = [(n, m) for n, m in ctx.layout.linears[index] if expert_index(n) < 0]
        h0, kw0 = states[0]
        leaders = [g[0] for g in probe_groups(layer, linears, h0, kw0)]
        mods = dict(ctx.layout.linears[index])
        self._cross, self._seen = {n: _Cross() for n in leaders}, {n: set() for n in leaders}
        self._hooks = [layer.register_forward_pre_hook(self._which_chunk)]
        self._hooks += [mods[n].register_forward_pre_hook(self._hook(n)) for n in leaders]

    def _which_chunk(self, layer, args) -> None:
        """Forwards of the layer on one of the pipeline's chunks (the very tensor) are calibration forwards; the
        pipeline's one-sample probe and other modifiers' forwards on other tensors are not."""
        x = args[0] if args else None
        self._chunk = next((j for j, h in enumerate(self._student_in) if h is x), None)

    def _hook(self, name: str):
        def hook(mod, args):
            j, x = self._chunk, args[0]
            if j is None or name not in self._cross:
                return  # not a calibration chunk, or this group was compressed already
            if j in self._seen[name]:  # a later sweep over the chunks (the pass's, after a modifier's): start over
                self._cross[name], self._seen[name] = _Cross(), set()
            if (name, j) not in self._pending:
                self._run_teacher(j)
            x_fp = self._pending.pop((name, j))
            if x_fp.shape != x.shape:  # inputs gathered by routing (not row for row): GPTQ's own target
                del self._cross[name]
                return
            self._cross[name].add(x_fp, x)
            self._seen[name].add(j)

        return hook

    @torch.no_grad()
    def _run_teacher(self, j: int) -> None:
        """The original layer on the original model's chunk j: every leader's input is kept until its own hook
        takes it (within the same chunk), the output becomes the next layer's teacher input."""

        def grab(name):
            return lambda mod, args: self._pending.__setitem__((name, j), args[0])

        self._pending = {}  # another chunk's leftovers are never read again
        handles = [self._original.get_submodule(n).register_forward_pre_hook(grab(n)) for n in self._cross]
        try:
            self._teacher_out[j] = run_layer(self._original, self._teacher_in[j], self._kwargs[j])
        finally:
            for h in handles:
                h.remove()

    def before_compress(self, ctx: RunContext, groups) -> None:
        """On every rank, for the groups about to be compressed: each cross term merged over the ranks' tokens (as
        the pass's Hessian was: each rank runs both streams on its own samples), then kept where it matches the
        Hessian's tokens. The same decision on every rank, so the count the export records is the whole run's."""
        for names, stats in groups:
            cross = self._cross.pop(names[0], None)
            if cross is None or not hasattr(stats, "H"):
                continue
            if ctx.dist.active:
                cross.all_reduce_(ctx.dist.sum_, stats.in_features)
            if cross.D is not None and cross.n == stats.n:
                self._ready[names[0]] = cross
                self.applied += len(names)

    def target_weights(self, ctx: RunContext, names, weights, stats) -> Optional[list]:
        cross = self._ready.pop(names[0], None)
        if cross is None:
            return None
        W = torch.cat([w.float() for w in weights], dim=0)
        V = asymmetric_target(W, stats.H, cross.D, self.alpha, self.damp)
        return list(V.split([w.shape[0] for w in weights], dim=0))

    @torch.no_grad()
    def refine_layer(self, ctx: RunContext, index: int, layer, results: dict) -> bool:
        """The teacher stream moves on through the original layer i (before anything else changes)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._cross, self._ready, self._chunk = [], {}, {}, None
        if self._original is not None:
            for j in range(len(self._teacher_in)):
                if j not in self._teacher_out:  # chunks no hook ran the teacher on
                    self._run_teacher(j)
            self._teacher_in = [self._teacher_out[j] for j in range(len(self._teacher_in))]
            self._original, self._teacher_out, self._pending, self._student_in, self._kwargs = None, {}, {}, [], []
        return False

    def at_export(self, ctx: RunContext, folder, extra: dict) -> None:
        if self.applied:
            extra["asymmetric_calibration"] = {"alpha": self.alpha, "linears": self.applied}

    def summary(self) -> dict:
        if not self.applied:
            return {}
        return {"asymmetric": f"α {self.alpha}, {self.applied} linears fitted to the original model's outputs"}
