"""The math of block-wise output reconstruction: what is trained, how a step moves it, and the loss.

A compressed linear is trained through what its format can hold, so the trained weight is always writable as it is:

- a quantized weight (codes, scales, zeros, g_idx) through AutoRound's two knobs, started from the pass's result:
  a rounding position v in [-1, 1] per weight and a scale multiplier m in [1 - M, 1 + M] per group. The weight
  acts as  s·(clamp(round(w0/s + v) + z, 0, 2^b - 1) - z),  s = s0·m,  with w0 the pass's own dequantized weight
  (on the code grid). v starts where the pass rounded from (GPTQ's QuantizedWeight.offsets, in [-1/2, 1/2]; 0
  without them), so at m = 1 the codes are the pass's exactly, a weight GPTQ rounded narrowly flips first, and no
  code moves more than one step from the pass's. Rounding passes gradients straight through (the
  straight-through estimator); zeros stay the pass's integers.
- a pruned float weight (SparseWeight) through its kept values, the mask fixed: the trained weight stays N:M.

The quantization knobs move by signed gradient descent (AutoRound's: every parameter steps ±lr, lr falling linearly
to 0): v and m are unitless, so one rate fits every layer. Kept values are weights of any scale: Adam moves them,
at a rate that falls the same way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional

import torch

from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.math.quant import fp16_exact

SCALE_RANGE = 0.25  # M: a group's scale may shrink or grow by up to a quarter (AutoRound clips to [0.5, 1])


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class Trainable:
    """One linear's trainable form. weight() is differentiable in params(); result() is the trained result."""

    def __init__(self, result, values_lr: float = 1e-4, original: Optional[torch.Tensor] = None):
        """original: the weight the pass compressed (float [out, in]); where the result carries no offsets, v
        starts at the original's rounding position (RTN's exactly)."""
        self.base = result
        self._kept: Any = None  # the kept values and their Adam (pruned results only)
        if isinstance(result, QuantizedWeight):
            g = result.g_idx.long()
            self._g = g
            self._w0 = result.dequantize(torch.float32)
            start = result.offsets
            if start is None and original is not None:
                pos = original.float() / result.scales.float()[:, g] + result.zeros.float()[:, g]
                start = (pos - result.codes.float()).clamp_(-0.5, 0.5)
            if start is None:
                start = torch.zeros_like(self._w0)
            self.v = start.detach().float().clone().requires_grad_(True)
            self.m = torch.ones_like(result.scales, dtype=torch.float32, requires_grad=True)
        elif isinstance(result, SparseWeight):
            self._kept = FloatParams({"values": result.values}, values_lr)
            self.values = self._kept.tensors["values"]
        else:
            raise TypeError(f"cannot train a {type(result).__name__}")
        self._lora = (
            result.lora_b.float() @ result.lora_a.float() if getattr(result, "lora_a", None) is not None else None
        )

    def _codes(self, s: torch.Tensor, rounding=round_ste):
        """(codes, per-column scales, per-column zeros) at group scales s [out, groups]."""
        r = self.base
        s_full, z_full = s[:, self._g], r.zeros.float()[:, self._g]
        return torch.clamp(rounding(self._w0 / s_full + self.v) + z_full, 0, 2**r.scheme.bits - 1), s_full, z_full

    def weight(self) -> torch.Tensor:
        """The weight the layer acts with (plus the fixed low-rank correction, if the result has one)."""
        if isinstance(self.base, QuantizedWeight):
            q, s_full, z_full = self._codes(self.base.scales.float() * self.m)
            w = (q - z_full) * s_full
            if self.base.mask is not None:
                w = w * self.base.mask
        else:
            w = self.values * self.base.mask
        return w if self._lora is None else w + self._lora

    @torch.no_grad()
    def step(self, lr: float, lr_fraction: float = 1.0) -> None:
        """One step at `lr`, a fraction of the starting rate for the kept values' Adam, then the bounds."""
        if isinstance(self.base, QuantizedWeight):
            for p in (self.v, self.m):
                if p.grad is not None:
                    p.sub_(lr * torch.sign(p.grad))
                    p.grad = None
            self.v.clamp_(-1.0, 1.0)
            self.m.clamp_(1 - SCALE_RANGE, 1 + SCALE_RANGE)
        else:
            self._kept.step(lr_fraction)

    @torch.no_grad()
    def result(self):
        """The trained result, in the pass's own form: integer codes and fp16-exact scales, or masked values."""
        r = self.base
        if isinstance(r, SparseWeight):
            return replace(r, values=(self.values * r.mask).to(r.values.dtype))
        s = fp16_exact(r.scales.float() * self.m)
        codes, _, z_full = self._codes(s, torch.round)
        if r.mask is not None:  # pruned codes stay at their zero point (they dequantize to exactly 0)
            codes = torch.where(r.mask, codes, z_full)
        return replace(r, codes=codes.to(r.codes.dtype), scales=s.to(r.scales.dtype), offsets=None)


class FloatParams:
    """Float tensors trained by Adam from their current values, at a starting rate scaled down by step's
    lr_fraction: a pruned weight's kept values, and a layer's float parameters outside its compressed linears
    (RMSNorm weights), which every format writes as they are. tensors: name → trainable copy."""

    def __init__(self, named: Dict[str, torch.Tensor], lr: float):
        self.lr = lr
        self.tensors = {n: t.detach().float().clone().requires_grad_(True) for n, t in named.items()}
        self._adam = torch.optim.Adam(list(self.tensors.values()), lr=lr) if self.tensors else None

    @torch.no_grad()
    def step(self, lr_fraction: float = 1.0) -> None:
        if self._adam is not None:
            self._adam.param_groups[0]["lr"] = self.lr * lr_fraction
            self._adam.step()
            self._adam.zero_grad(set_to_none=True)

    @torch.no_grad()
    def snapshot(self) -> Dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.tensors.items()}


def normalized_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SquareHead's layer-wise distillation loss: the squared error over the target's mean square, so blocks of
    very different activation scale weigh alike (0: exact; 1: as far as predicting zeros)."""
    out, target = out.float(), target.float()
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def linear_decay(step: int, steps: int, lr: float) -> float:
    return lr * (1.0 - step / max(steps, 1))


def trainables(
    results: Dict[str, object], originals: Dict[str, torch.Tensor], values_lr: float = 1e-4
) -> Dict[str, Trainable]:
    """A Trainable per result it can train (QuantizedWeight or SparseWeight); others are left as they are."""
    return {
        n: Trainable(r, values_lr, originals.get(n))
        for n, r in results.items()
        if isinstance(r, (QuantizedWeight, SparseWeight))
    }
