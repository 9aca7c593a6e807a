"""Sparsity patterns and the one mask function every pruning pass uses. Pure: tensors in, tensors out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress_export.core.errors import UserError


@dataclass(frozen=True)
class Sparsity:
    """N:M structured (keep n of every m consecutive input weights of a row) or unstructured (prune `ratio`)."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:g}"

    @staticmethod
    def parse(text: str) -> Sparsity:
        """'2:4' (N:M) or a fraction such as '0.5' (unstructured)."""
        try:
            if ":" in text:
                n, m = (int(v) for v in text.split(":"))
                if not 0 < n < m:
                    raise ValueError
                return Sparsity(n=n, m=m)
            r = float(text)
            if not 0 < r < 1:
                raise ValueError
            return Sparsity(ratio=r)
        except ValueError:
            raise UserError(
                f"--sparsity {text!r}: give N:M with 0 < N < M (e.g. 2:4) or a fraction in (0, 1)"
            ) from None


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask (bool, same shape) keeping the n highest scores of every m consecutive entries along the last dim."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of {m}")
    g = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(2, g.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Unstructured keep mask pruning the lowest `ratio` of each row (Wanda's per-output comparison group)."""
    k = int(scores.shape[1] * ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return keep


def mask_for(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    return nm_mask(scores, sparsity.n, sparsity.m) if sparsity.structured else row_mask(scores, sparsity.ratio)
