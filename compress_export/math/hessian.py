"""The one Hessian core shared by GPTQ and SparseGPT: accumulate H = 2XXᵀ/n, dampen, invert via Cholesky."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from compress_export.core.errors import UserError

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


class HessianAccumulator:
    """Running mean of 2·x xᵀ over every token row seen; one per distinct linear input.

    Kept in float32 as a running average (not a raw sum) so magnitudes stay bounded however many tokens pass.
    Only the upper triangle is accumulated, in row blocks (H is symmetric): that halves the arithmetic of the
    most expensive step after the forward itself; `.H` mirrors it into the full matrix on demand.
    """

    BLOCK = 192  # measured best on 576/1536-wide inputs: 0.11 s / 0.78 s against 0.22 s / 1.63 s for one GEMM

    def __init__(self, in_features: int):
        self.in_features = in_features
        # allocated on the device of the first input (the layer's --device)
        self._upper: Optional[torch.Tensor] = None
        self._full: Optional[torch.Tensor] = None
        self.n = 0

    def _storage(self, device=None) -> torch.Tensor:
        if self._upper is None:
            d = self.in_features
            self._upper = torch.zeros(d, d, dtype=torch.float32, device=device)
        return self._upper

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.dtype != torch.float32:
            x = x.float()
        m = x.shape[0]
        if m == 0:
            return
        upper = self._storage(x.device)
        total = self.n + m
        # H ← H·n/(n+m) + 2·xᵀx/(n+m) on row blocks of the upper triangle, without copying x
        d = x.shape[1]
        for a in range(0, d, self.BLOCK):
            b = min(a + self.BLOCK, d)
            upper[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], beta=self.n / total, alpha=2.0 / total)
        self.n = total
        self._full = None

    def all_reduce_(self, sum_, device) -> None:
        """Merge every rank's statistics into those of all their rows (distributed calibration). sum_(t) sums t
        in place over the ranks. Each rank's running mean is weighted by its share of the rows, then summed."""
        total = int(sum_(torch.tensor([float(self.n)], dtype=torch.float64, device=device)).item())
        share = self.n / total if total else 0.0
        self._merge(sum_, share, device)
        self.n = total

    def _merge(self, sum_, share: float, device) -> None:
        sum_(self._storage(device).mul_(share))
        self._full = None

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The statistics of inputs x/s (x divided per channel), without re-running the forward."""
        inv = 1.0 / s.float()
        self._storage(s.device).mul_(inv[:, None] * inv[None, :])
        self._full = None

    @property
    def H(self) -> torch.Tensor:
        """The full symmetric matrix [in, in] (float32)."""
        if self._full is None:
            upper = torch.triu(self._storage())
            self._full = upper + torch.triu(upper, 1).t()
        return self._full


@dataclass
class InverseHessian:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), the form GPTQ's column updates read row by row.

    dead: bool [n], input columns whose activation never fired (their weights carry no signal).
    damp: the relative dampening finally used.
    """

    U: torch.Tensor
    dead: torch.Tensor
    damp: float


def _upper_inverse_factor(H: torch.Tensor, damping: torch.Tensor):
    """U with UᵀU = (H + damping)⁻¹, or None if not positive definite.

    float32 first (what GPTQ's reference uses; 2.3× faster at 1536 columns), float64 only when float32 fails.
    """
    for dtype in (torch.float32, torch.float64):
        L, info = torch.linalg.cholesky_ex((H + damping).to(dtype))
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U.float()
    return None


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    return torch.diag(H) == 0


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, name: str = "layer") -> InverseHessian:
    """Dampen H by λ = damp·mean(diag H) and return the upper Cholesky factor of its inverse.

    A matrix that is still not positive definite gets ten times the dampening, with a warning naming the layer,
    instead of a crash; only a hopeless matrix (non-finite) raises.
    """
    H = H.double().clone()
    if not torch.isfinite(H).all():
        raise UserError(
            f"{name}: its calibration inputs hold NaN or Inf (the activations overflowed before this "
            "layer); check the model runs in transformers on this text, or calibrate on another --dataset"
        )
    dead = dead_columns(H)
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        U = _upper_inverse_factor(H, d * mean_diag * eye)
        if U is not None:
            return InverseHessian(U, dead, d)
        if attempt < MAX_DAMP_RETRIES:
            new = d * 10 if d > 0 else 1e-4
            log.warning("%s: Hessian not positive definite at damp=%g; retrying with damp=%g", name, d, new)
            d = new
    raise UserError(
        f"{name}: its calibration Hessian stays singular even at damp={d:g}; give more or more varied "
        "calibration text (--dataset, --num-samples) or a larger --damp"
    )
