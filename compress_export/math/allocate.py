"""Mixed precision under a size budget: the math (issue 26, step 3). Pure functions on tensors and numbers; the
pipeline supplies the candidates (one entry per set of linears that must share a scheme: q/k/v, gate/up, a MoE
layer's experts) and writes what is chosen.

- `weighted_error`: how much a scheme costs a linear, Σ_oj F_oj (W − RTN(W))_oj² with F the loss sensitivity of
  each weight (a token-wise Fisher diagonal, `fisher_diagonal`): proportional to the second-order estimate of the
  loss it adds when weights are independent and positions' gradients are. A weight [in] instead of [out, in] (the mean x_j² per input column) gives the error at
  the linear's own output, HAWQ's "Hessian trace × quantization error" per column.
- `allocate`: the choice of one candidate per entry that minimises the summed error with the summed bytes within
  the budget: a multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into `units`
  steps. Each candidate's size is rounded *up* to whole steps, so a choice that fits in steps fits in bytes: the
  budget holds exactly, never by rounding luck. The cost of the rounding is at most one step per entry of slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.math.quant import rtn_quantize

# budget steps: the rounding costs at most one step per entry (SmolLM2's 120 entries: 0.2% of the budget), and the
# table is entries × steps small integers (a 70B model's 320 entries: 42 MB)
DEFAULT_UNITS = 65536


@dataclass(frozen=True)
class Candidate:
    """One way to store an entry: its bytes on disk (every packed tensor: codes, scales, zeros, g_idx) and the
    error it costs (weighted_error summed over the entry's linears)."""

    nbytes: int
    error: float


def weighted_error(W: torch.Tensor, weight: torch.Tensor, scheme: Scheme) -> float:
    """Σ weight ⊙ (W − RTN(W))² for W [out, in] and weight [out, in], [in] (broadcast over rows) or a scalar:
    round-to-nearest's error at `scheme`, each weight's square scaled by how much it matters (module's text)."""
    if weight.shape not in (W.shape, (W.shape[1],), ()):
        raise ValueError(f"the weighting has shape {list(weight.shape)}, the weight {list(W.shape)}")
    W = W.detach()
    err = (W.float() - rtn_quantize(W, scheme).dequantize()).pow_(2)
    return float((err * weight.to(W.device).float()).sum())


def allocate(entries: Sequence[Sequence[Candidate]], budget: int, units: int = DEFAULT_UNITS) -> List[int]:
    """For each entry, the index of its chosen candidate: Σ error minimal over the choices whose rounded sizes fit
    (see the module's text), Σ nbytes ≤ budget always. Ties go to the smaller total size. Raises UserError when even
    the smallest candidates exceed the budget (naming how many bytes the smallest choice needs)."""
    if not entries:
        return []
    if any(not cands for cands in entries):
        raise ValueError("every entry needs at least one candidate")
    smallest = sum(min(c.nbytes for c in cands) for cands in entries)
    if smallest > budget:
        raise UserError(
            f"the size budget is {budget / 1e6:.1f} MB but the smallest allowed choice already needs "
            f"{smallest / 1e6:.1f} MB: raise --size-mb / --avg-bits, or add a smaller width to --mixed-bits"
        )
    best_each = [min(range(len(c)), key=lambda j: (c[j].error, c[j].nbytes)) for c in entries]
    if sum(c[j].nbytes for c, j in zip(entries, best_each)) <= budget:  # every entry at its best fits: no search
        return best_each
    step = max(1, -(-budget // units))  # bytes per step, rounded up: at most `units` steps in the budget
    cap = budget // step
    sizes = [[-(-c.nbytes // step) for c in cands] for cands in entries]
    inf = float("inf")
    # best[u]: least error of the entries so far using exactly u steps; pick[k][u]: entry k's choice there
    best = torch.full((cap + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for cands, sz in zip(entries, sizes):
        nxt = torch.full_like(best, inf)
        pick = torch.full((cap + 1,), -1, dtype=torch.int16 if len(cands) < 2**15 else torch.int32)
        for j, (c, s) in enumerate(zip(cands, sz)):
            if s > cap:
                continue
            cand = torch.full_like(best, inf)
            cand[s:] = best[: cap + 1 - s] + c.error
            better = cand < nxt
            nxt = torch.where(better, cand, nxt)
            pick[better] = j
        best = nxt
        picks.append(pick)
    if not torch.isfinite(best).any():  # rounding up to steps lost the last fit: fall back to the smallest
        return [min(range(len(c)), key=lambda j: (c[j].nbytes, c[j].error)) for c in entries]
    u = int(torch.argmin(best))  # argmin returns the first minimum: the smallest size among equal errors
    out = []
    for k in range(len(entries) - 1, -1, -1):
        j = int(picks[k][u])
        out.append(j)
        u -= sizes[k][j]
    return out[::-1]


def fisher_diagonal(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_t g_to² x_tj² for a linear's inputs x [..., in] and the loss gradient at its outputs g [..., out]: the
    token-wise diagonal of the empirical Fisher information of its weight, [out, in]: each position's piece
    g_t x_tᵀ of the gradient of the whole sequence's loss squared on its own (cross-position terms dropped)."""
    x2 = x.reshape(-1, x.shape[-1]).float().pow(2)
    g2 = g.reshape(-1, g.shape[-1]).float().pow(2)
    return g2.t() @ x2
