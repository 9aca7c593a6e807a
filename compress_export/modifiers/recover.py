"""Recovery by layer-wise distillation (`--recover kd`): each compressed decoder layer is trained, within what its
format can hold, to reproduce the original model's layer.

Teacher and student run side by side, a layer at a time, so memory stays flat in depth:

- the teacher stream: the original layer i applied to the original model's hidden states (computed in before_layer,
  before the pass changes the layer's weights), which become the next layer's teacher inputs;
- the student stream: the calibration states as the pipeline propagates them, through the layers already
  compressed (and trained).

After the pass compressed every linear of layer i and before any of it is written (refine_layer), the student layer
on the student inputs is fitted to the teacher's outputs by SquareHead's normalised MSE (math/reconstruct.py). This
is GPTAQ's asymmetric target: each layer also corrects the error its compressed prefix let through. What is trained
is what the format holds: rounding offsets and scale multipliers of a quantized result (codes re-derived, AutoRound
style) or the kept values of a pruned one (mask fixed, so 2:4 stays 2:4). The trained result is kept only where its
loss on the calibration samples fell; the loss before and after is printed on the progress line and summarised.

The steps' matmuls run in bf16 (autocast) where bf16 is the machine's fast dtype (AVX-512 bf16/AMX CPUs, CUDA;
`train_in_bf16`), float32 elsewhere; the losses that pick the kept checkpoint are float32 everywhere, and the
export's recipe records which ran. The layer's norm weights can be trained too (NORMS_LR; off: not measured to
help yet).

Off by default: `--recover kd` turns it on for any weight-only pass, `--recover-steps` bounds it (default 100 per
layer). Its figures are in benchmarks/README.md ("Recovery by layer-wise distillation"); it is not the GPTQ default
yet, because its gain at W4 and its time against AutoRound's are not measured side by side.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch.func import functional_call

from compress_export.core.errors import UserError
from compress_export.core.hardware import fast_dtype
from compress_export.core.result import corrected, stored_as
from compress_export.math.reconstruct import FloatParams, linear_decay, normalized_mse, trainables
from compress_export.modifiers.base import Modifier, PlanContext, RunContext, register_modifier
from compress_export.passes.sequential import run_layer, take_rows

DEFAULT_STEPS = 100  # per decoder layer: 2:4 SmolLM2 in benchmarks/README.md
EVAL_ROWS = 16  # calibration samples the before/after loss is measured on
CHECKPOINTS = 4  # loss measurements during training; the best wins
VALUES_LR = 1e-4  # Adam's starting rate for the kept values of pruned weights
NORMS_LR = 0.0  # Adam's starting rate for the layer's norm weights (0: not trained)


@register_modifier("recover")
class Recover(Modifier):
    """Layer-wise distillation of each compressed layer against the original (see the module's text)."""

    order = 40

    needs_calibration = True
    needs_rounding_offsets = True  # training starts from GPTQ's own rounding positions

    def __init__(
        self,
        steps: int,
        lr: Optional[float] = None,
        batch: int = 4,
        values_lr: float = VALUES_LR,
        seed: int = 0,
        norms_lr: float = NORMS_LR,
    ):
        # AutoRound's rate: 1/steps, falling linearly, so a rounding offset can travel up to 1/2 over the run
        self.steps, self.lr, self.batch, self.values_lr, self.seed = steps, lr or 1.0 / steps, batch, values_lr, seed
        self.norms_lr = norms_lr  # 0: the layer's norms stay as they are
        self.train_dtype = "float32"
        self._teacher_in = self._inputs = self._targets = None
        self._originals: dict = {}
        self.losses: list = []
        self._note = ""

    @classmethod
    def plan(cls, config, ctx: PlanContext) -> Optional[Recover]:
        if config.recover != "kd":  # off unless asked for: see the module's text
            return None
        s = ctx.scheme
        if s is not None and s.act_bits < 16:
            raise UserError(
                f"--recover kd trains weight-only results; {s.act_bits}-bit activations are not: drop --recover"
            )
        steps = config.recover_steps if config.recover_steps is not None else DEFAULT_STEPS
        if not steps:
            return None
        return cls(steps, batch=min(4, config.num_samples), seed=config.seed, values_lr=VALUES_LR, norms_lr=NORMS_LR)

    def before_pass(self, ctx: RunContext) -> None:
        if ctx.dist.active:
            raise UserError(
                "--recover kd trains on every calibration sample in one process; under torchrun add --recover none"
            )
        self._teacher_in, self.losses = None, []

    @torch.no_grad()
    def before_layer(self, ctx: RunContext, index: int, layer, states: Optional[list]) -> None:
        """The teacher's outputs of layer i, while its weights are still the original's."""
        if states is None:
            return
        if self._teacher_in is None:  # layer 0: teacher and student inputs are the same
            self._teacher_in = [h for h, _ in states]
        self._inputs = states
        self._targets = [run_layer(layer, h, kw) for h, (_, kw) in zip(self._teacher_in, states)]
        # the weights the pass is about to replace in place: where a result carries no rounding positions
        # (RTN), training starts from the original's
        self._originals = {n: m.weight.detach().float().clone() for n, m in ctx.layout.linears[index]}

    def refine_layer(self, ctx: RunContext, index: int, layer, results: dict) -> bool:
        """Train layer i's compressed results (local name → result, replaced in place); True when any changed.
        The loss on the evaluation samples is measured before training and at CHECKPOINTS points of it; the best
        results win, so a layer never leaves worse than the pass made it (AutoRound keeps its best step too)."""
        inputs, targets = self._inputs, self._targets
        self._teacher_in, self._inputs, self._targets = targets, None, None  # the next layer's teacher inputs
        train = trainables(results, self._originals, self.values_lr)
        self._originals = {}
        if inputs is None or not train:
            return False
        norms = FloatParams(norm_weights(layer, train) if self.norms_lr else {}, self.norms_lr)
        t0, frozen = time.time(), [p for p in layer.parameters() if p.requires_grad]
        for p in frozen:  # gradients only for what is trained
            p.requires_grad_(False)
        try:
            before = self._loss(layer, inputs, targets, {})  # the layer holds the pass's results now
            best, best_results, best_norms = before, None, {}
            for _ in self._train(layer, inputs, targets, train, norms, index):  # at each checkpoint
                trained = {n: stored_as(t.result(), ctx.storage_dtype) for n, t in train.items()}
                kept = {n: v.to(ctx.storage_dtype or v.dtype).float() for n, v in norms.snapshot().items()}
                weights = {f"{n}.weight": corrected(r) for n, r in trained.items()}
                loss = self._loss(layer, inputs, targets, {**weights, **kept})
                if loss < best:
                    best, best_results, best_norms = loss, trained, kept
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.losses.append((before, best))
        self._note = f"kd {before:.4f}→{best:.4f} ({time.time() - t0:.0f}s)"
        if best_results is None:
            return False
        results.update(best_results)
        for n, r in best_results.items():
            w = layer.get_submodule(n).weight
            w.data.copy_(corrected(r).to(w.dtype))
        for n, v in best_norms.items():  # written with the layer's other float tensors
            p = layer.get_parameter(n)
            p.data.copy_(v.to(p.dtype))
        return True

    def _train(self, layer, inputs, targets, train: dict, norms: FloatParams, index: int):
        """The training steps; yields at each checkpoint (every steps / CHECKPOINTS steps, and at the end)."""
        gen = torch.Generator().manual_seed(self.seed * 100003 + index)
        params = [f"{n}.weight" for n in train]
        device = next(layer.parameters()).device.type
        bf16 = train_in_bf16(device)
        self.train_dtype = "bfloat16" if bf16 else "float32"
        every = max(1, self.steps // CHECKPOINTS)
        for step in range(self.steps):
            c = step % len(inputs)
            hidden, kw = inputs[c]
            rows = torch.randperm(hidden.shape[0], generator=gen)[: self.batch]
            with torch.enable_grad(), torch.autocast(device, torch.bfloat16, enabled=bf16):
                weights = {**dict(zip(params, (t.weight() for t in train.values()))), **norms.tensors}
                out = _forward(layer, weights, hidden[rows], take_rows(kw, hidden.shape[0], rows))
                loss = normalized_mse(out, targets[c][rows])
            loss.backward()
            lr = linear_decay(step, self.steps, self.lr)
            for t in train.values():
                t.step(lr, lr / self.lr)
            norms.step(lr / self.lr)
            if (step + 1) % every == 0 or step + 1 == self.steps:
                yield step + 1

    @torch.no_grad()
    def _loss(self, layer, inputs, targets, named: dict) -> float:
        """The normalised MSE on up to EVAL_ROWS calibration samples with the parameters `named` (name → tensor)
        in place of the layer's."""
        num = den = 0.0
        left = EVAL_ROWS
        for (hidden, kw), target in zip(inputs, targets):
            rows = torch.arange(min(left, hidden.shape[0]))
            if not len(rows):
                break
            out = _forward(layer, named, hidden[rows], take_rows(kw, hidden.shape[0], rows)).float()
            num += float((out - target[rows].float()).pow(2).sum())
            den += float(target[rows].float().pow(2).sum())
            left -= len(rows)
        return num / max(den, 1e-30)

    def layer_note(self) -> str:
        note, self._note = self._note, ""
        return note

    def summary(self) -> dict:
        if not self.losses:
            return {}
        b = sum(x for x, _ in self.losses) / len(self.losses)
        a = sum(y for _, y in self.losses) / len(self.losses)
        return {"recover": f"kd {self.steps} steps/layer, mean layer loss {b:.4f} → {a:.4f}"}

    def at_export(self, ctx: RunContext, folder, extra: dict) -> None:
        extra["recover"] = {
            "method": "kd",
            "loss": "squarehead",
            "steps": self.steps,
            "lr": self.lr,
            "values_lr": self.values_lr,
            "norms_lr": self.norms_lr,
            "train_dtype": self.train_dtype,  # the steps' matmuls (train_in_bf16): a machine's kind changes it
        }


def train_in_bf16(device: str) -> bool:
    """The training steps' matmuls run in bf16 (autocast) where bf16 is this machine's fast dtype (AVX-512 bf16 or
    AMX CPUs, CUDA): 2× faster per step on an AMX Xeon, and only the gradients' signs and Adam's normalised steps
    use them. The losses that decide which checkpoint is kept are computed in float32 everywhere."""
    return device in ("cpu", "cuda") and fast_dtype(device) == "bfloat16"


def norm_weights(layer, train: dict) -> dict:
    """The layer's one-dimensional float parameters outside its linears (RMSNorm weights): name → tensor."""
    linears = tuple(f"{n}." for n in train)
    return {
        n: p
        for n, p in layer.named_parameters()
        if p.dim() == 1 and p.is_floating_point() and not n.startswith(linears)
    }


def _forward(layer, weights: dict, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = functional_call(layer, weights, (hidden,), kwargs, strict=False)
    return out[0] if isinstance(out, (tuple, list)) else out
