"""AWQ (Lin et al. 2023) as pure functions: per-input-channel scale search and folding, tensors in and out.

The objective is the paper's, L(s) = ‖Q(W·diag(s))·diag(s)⁻¹·X − W·X‖² summed over every calibration token,
evaluated exactly as tr(ΔW H ΔWᵀ) with H = 2XᵀX/n (the shared Hessian core): one matrix product per grid
point instead of re-running the layer on stored activations. AutoAWQ and llm-compressor score q/k/v and gate/up
on the output of the whole attention or MLP block instead; `search_scale` takes that loss as a function.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

from compress_export.core.scheme import Scheme
from compress_export.math.quant import rtn_quantize

SCALE_GRID = 20  # α ∈ {0, 0.05, …, 0.95}: s = mean|x|^α, α = 0 is "no scaling"


def quadratic_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """Σ_r D_r H D_rᵀ: the output error of weight error D [rows, in] over inputs with Hessian H."""
    return float(((D @ H) * D).sum())


def rtn_dequant(W: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Min-max round-to-nearest and back, the quantizer AWQ's scale search scores against."""
    return rtn_quantize(W, scheme).dequantize()


def candidate_scales(x_absmean: torch.Tensor, grid: int = SCALE_GRID) -> torch.Tensor:
    """The grid of per-input-channel scales AWQ tries: s_k = mean|x|^(k/grid), normalised so √(max·min) = 1 as
    in the reference. Returns [grid, in]; row 0 is no scaling."""
    x = x_absmean.float().clamp(min=0)
    rows = []
    for k in range(grid):  # a scalar exponent per row: a tensor of exponents rounds the last bit differently
        s = x.pow(k / grid).clamp(min=1e-4)
        rows.append(s / (s.max() * s.min()).sqrt())
    return torch.stack(rows)


def scaled_dequant(W: torch.Tensor, s: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The weight the balance linears act with on their original input once s is folded and W·s quantized."""
    return rtn_dequant(W * s, scheme) / s


@torch.no_grad()
def search_scale(
    W: torch.Tensor,
    H: torch.Tensor,
    x_absmean: torch.Tensor,
    scheme: Scheme,
    grid: int = SCALE_GRID,
    loss_of=None,
    reduce_sum=None,
) -> Tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale s [in] for the balance weights W [rows, in] (concatenated).

    loss_of(effective W) -> summed error: None scores the balance linears' own output, tr(ΔW H ΔWᵀ); AWQ's
    references score the output of the block the linears sit in (the pass passes that in). reduce_sum sums the
    grid's losses over distributed ranks when each rank saw only its own tokens.
    Returns (s, loss at s, loss without scaling)."""
    W = W.float()
    if loss_of is None:

        def loss_of(effective):
            return quadratic_error(W - effective, H)

    candidates = candidate_scales(x_absmean, grid)
    losses = torch.tensor([float(loss_of(scaled_dequant(W, s, scheme))) for s in candidates], dtype=torch.float64)
    if reduce_sum is not None:
        losses = reduce_sum(losses)
    best = int(torch.argmin(losses))
    return candidates[best], float(losses[best]), float(losses[0])


@torch.no_grad()
def fold_scale(smooth: Any, balance: list, s: torch.Tensor) -> None:
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
