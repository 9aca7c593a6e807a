"""The one Hessian core shared by GPTQ and SparseGPT: accumulate H = 2XXᵀ/n, dampen, invert via Cholesky."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


class HessianAccumulator:
    """Running mean of 2·x xᵀ over every token row seen; one per distinct linear input.

    Kept in float32 as a running average (not a raw sum) so magnitudes stay bounded however many tokens pass.
    """

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.dtype != torch.float32:
            x = x.float()
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        # H ← H·n/(n+m) + 2·xᵀx/(n+m), in one GEMM without copying x
        self.H.addmm_(x.t(), x, beta=self.n / total, alpha=2.0 / total)
        self.n = total


@dataclass
class InverseHessian:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), the form GPTQ's column updates read row by row.

    dead: bool [n], input columns whose activation never fired (their weights carry no signal).
    damp: the relative dampening finally used.
    """

    U: torch.Tensor
    dead: torch.Tensor
    damp: float


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    return torch.diag(H) == 0


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, name: str = "layer") -> InverseHessian:
    """Dampen H by λ = damp·mean(diag H) and return the upper Cholesky factor of its inverse.

    A matrix that is still not positive definite gets ten times the dampening, with a warning naming the layer,
    instead of a crash; only a hopeless matrix (non-finite) raises.
    """
    H = H.double().clone()
    if not torch.isfinite(H).all():
        raise FloatingPointError(f"{name}: the calibration Hessian has NaN/Inf entries (non-finite activations)")
    dead = dead_columns(H)
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    d = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info2.item() == 0:
                return InverseHessian(U.float(), dead, d)
        if attempt < MAX_DAMP_RETRIES:
            new = d * 10 if d > 0 else 1e-4
            log.warning("%s: Hessian not positive definite at damp=%g; retrying with damp=%g", name, d, new)
            d = new
    raise FloatingPointError(f"{name}: Hessian stays singular even at damp={d:g}")
