"""AWQ (Lin et al. 2023) as pure functions: per-input-channel scale search and folding, tensors in and out.

The objective is the paper's, L(s) = ‖Q(W·diag(s))·diag(s)⁻¹·X − W·X‖² summed over every calibration token,
evaluated exactly as tr(ΔW H ΔWᵀ) with H = 2XᵀX/n (the shared Hessian core): one matrix product per grid
point instead of re-running the layer on stored activations.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .quant import rtn_quantize
from .scheme import Scheme

SCALE_GRID = 20  # α ∈ {0, 0.05, …, 0.95}: s = mean|x|^α, α = 0 is "no scaling"


def quadratic_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """Σ_r D_r H D_rᵀ: the output error of weight error D [rows, in] over inputs with Hessian H."""
    return float(((D @ H) * D).sum())


def rtn_dequant(W: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Min-max round-to-nearest and back, the quantizer AWQ's scale search scores against."""
    return rtn_quantize(W, scheme).dequantize()


@torch.no_grad()
def search_scale(W: torch.Tensor, H: torch.Tensor, x_absmean: torch.Tensor, scheme: Scheme,
                 grid: int = SCALE_GRID) -> Tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale s [in] for the balance weights W [rows, in] (concatenated).

    Returns (s, loss at s, loss without scaling). s is normalised so √(max·min) = 1, as in the reference.
    """
    W = W.float()
    x = x_absmean.float().clamp(min=0)
    best_s, best_loss, base = torch.ones_like(x), float("inf"), float("nan")
    for k in range(grid):
        alpha = k / grid
        s = x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        D = W - rtn_dequant(W * s, scheme) / s
        loss = quadratic_error(D, H)
        if k == 0:
            base = loss
        if loss < best_loss:
            best_loss, best_s = loss, s
    return best_s, best_loss, base


@torch.no_grad()
def fold_scale(smooth: torch.nn.Module, balance: list, s: torch.Tensor) -> None:
    """Divide the op before by s and multiply the balance linears' input columns by s: same function.

    smooth: a norm (per-channel weight, optional bias) or a linear whose output rows feed the balance linears.
    """
    s = s.to(smooth.weight.dtype)
    if isinstance(smooth, torch.nn.Linear):
        smooth.weight.div_(s[:, None])
    else:
        smooth.weight.div_(s)
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.div_(s)
    for lin in balance:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
