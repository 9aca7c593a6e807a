"""Mixed precision under a size budget (--avg-bits, --size-mb): which bit width each set of linears gets.

Before the pass, the original model's loss sensitivity is measured on the calibration set: one forward and one
backward sweep, a layer at a time (pipeline/sensitivity.py), give every weight's Fisher diagonal F. Each set of
linears that read the same input (q/k/v, gate/up: the pass compresses them as one matrix and engines fuse them,
so they share a scheme) is then scored at each candidate width by Σ F·(W − RTN(W))², proportional to the
second-order estimate of what that rounding adds to the loss (math/allocate.weighted_error); its size comes from
the format's own tensor layout, and allocate() picks the widths that minimise the summed estimate within the
budget. The pass then compresses each set at its width (Pass.scheme_for) and the format records the choice per
module (GPTQ's `dynamic` overrides).

An earlier measure weighted the error at each linear's own output (Σ_j E[x_j²]·‖ΔW[:, j]‖²): it ranks a linear
by how much its outputs move, not by how much the rest of the model makes of that; on a dev split of calib.txt
it took 3.9% of the W3 → W4 perplexity gap at 3.5 bits where the Fisher weighting takes 18% (benchmarks/README.md;
the other estimators tried are in benchmarks/results/mixed_precision_estimators.txt).

The budget: --avg-bits B is the size the quantized linears would take at B bits each (the format's bytes are
affine in the bit width, so a fractional B is the interpolation between whole widths: 3.5 is halfway between
uniform W3 and W4); --size-mb M is the whole export's weights, what is not quantized (embeddings, norms, the head)
counted as it is stored.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from compress_export.core.errors import UserError
from compress_export.core.moe import expert_index
from compress_export.core.scheme import Scheme
from compress_export.core.structure import final_norm
from compress_export.io import model_io
from compress_export.math.allocate import Candidate, allocate, weighted_error
from compress_export.pipeline import sensitivity

log = logging.getLogger(__name__)

MIXED_FORMATS = ("gptq", "compressed-tensors")  # formats that record a scheme per module
MIXED_METHODS = ("gptq", "rtn")
MIXED_BITS_DEFAULT = (3, 4, 8)


@dataclass(frozen=True)
class MixedBudget:
    """What the plan resolved: the candidates (the plan's scheme at each width) and one budget."""

    bits: Tuple[int, ...]
    avg_bits: Optional[float] = None
    size_mb: Optional[float] = None

    def describe(self) -> str:
        what = f"{self.avg_bits:g} average bits" if self.avg_bits else f"{self.size_mb:g} MB"
        return f"{what} from {'/'.join(map(str, self.bits))} bits"


def plan_mixed(config, format_, method: str, scheme: Optional[Scheme], sparsity, container) -> Optional[MixedBudget]:
    """The budget config asks for, checked against the run (a UserError naming the flag otherwise)."""
    if config.avg_bits is None and config.size_mb is None:
        if tuple(config.mixed_bits) != MIXED_BITS_DEFAULT:
            raise UserError("--mixed-bits names the widths of mixed precision: add --avg-bits or --size-mb")
        return None
    flag = "--avg-bits" if config.avg_bits is not None else "--size-mb"
    if config.avg_bits is not None and config.size_mb is not None:
        raise UserError("--avg-bits and --size-mb both set a size budget: give one")
    if container or format_.name not in MIXED_FORMATS:
        raise UserError(f"{flag}: mixed precision is written as --format {'/'.join(MIXED_FORMATS)} (not yet others)")
    if method not in MIXED_METHODS or sparsity is not None:
        raise UserError(f"{flag}: mixed precision runs with --method {' or '.join(MIXED_METHODS)}, unpruned")
    if scheme is None or scheme.act_bits != 16:
        raise UserError(f"{flag}: mixed precision is for weight-only schemes (not W8A8)")
    if config.size_mb is not None and config.lowrank_rank:
        raise UserError(
            "--size-mb bounds the export's weights, and --lowrank-rank adds an adapter beside them: "
            "use --avg-bits with it, or drop one"
        )
    bits = tuple(config.mixed_bits)
    for b in bits:
        format_.check(scheme.with_(bits=b), None)
    if config.avg_bits is not None and not bits[0] <= config.avg_bits <= bits[-1]:
        raise UserError(f"--avg-bits {config.avg_bits:g} is outside --mixed-bits {bits[0]}..{bits[-1]}")
    return MixedBudget(bits, config.avg_bits, config.size_mb)


def check_layout(layout, skeleton) -> None:
    """What config.json's structure rules out (preflight, before any weight is read): MoE experts, and a model
    whose final norm the sensitivity sweep cannot find."""
    final_norm(skeleton, layout)
    if any(expert_index(n) >= 0 for lin in layout.linears for n, _ in lin):
        raise UserError(
            "mixed precision (--avg-bits/--size-mb) does not handle MoE experts yet (a layer's experts run as one "
            "fused kernel at one width): drop it for this model"
        )


@dataclass
class Entry:
    """A set of linears that must share a scheme, with its candidates (one per width, in budget.bits order)."""

    layer: int  # the decoder layer's index
    names: Tuple[str, ...]  # full names
    candidates: List[Candidate]


def _layout_bytes(fmt, scheme: Scheme, in_f: int, out_f: int) -> int:
    return sum(
        math.prod(spec.shape) * torch.empty(0, dtype=spec.dtype).element_size()
        for spec in fmt.tensor_layout(scheme, in_f, out_f).values()
    )


def measure(
    source, layout, fmt, scheme: Scheme, budget: MixedBudget, ids, batch_size, device, progress, spool_dir=None
) -> list:
    """Every entry's candidates: each width's rounding error weighted by the loss sensitivity of every weight
    (pipeline/sensitivity.py; its layer inputs spooled in `spool_dir`), its bytes from the format's layout."""
    entries: list = []
    sweep = sensitivity.fisher_layers(source, layout, ids, batch_size, device, progress, spool_dir)
    with contextlib.closing(sweep) as layers:  # closed on an error too: the spool goes at once
        for i, members, fisher in layers:
            mods = dict(layout.linears[i])
            for group in members:
                cands = []
                for b in budget.bits:
                    s = scheme.with_(bits=b)
                    # a linear no gradient reached does not move the loss: zero sensitivity
                    err = sum(weighted_error(mods[n].weight, fisher.get(n, torch.zeros(())), s) for n in group)
                    nbytes = sum(_layout_bytes(fmt, s, mods[n].in_features, mods[n].out_features) for n in group)
                    cands.append(Candidate(nbytes, err))
                entries.append(Entry(i, tuple(layout.full_name(i, n) for n in group), cands))
    entries.sort(key=lambda e: e.layer)  # measured last layer first; stable within a layer
    unseen = {layout.full_name(i, n) for i, lin in enumerate(layout.linears) for n, _ in lin}
    unseen -= {n for e in entries for n in e.names}
    if unseen:
        raise UserError(
            f"mixed precision: no calibration token reached {sorted(unseen)[0]}; its sensitivity is unknown"
        )
    return entries


def budget_bytes(budget: MixedBudget, entries: list, index: dict) -> int:
    """The bytes allocate() may spend on the entries (see the module's text)."""
    if budget.avg_bits is not None:
        lo, hi = budget.bits[0], budget.bits[-1]
        t = (budget.avg_bits - lo) / (hi - lo)
        return int(
            sum(e.candidates[0].nbytes + t * (e.candidates[-1].nbytes - e.candidates[0].nbytes) for e in entries)
        )
    assert budget.size_mb is not None
    quantized = {n + ".weight" for e in entries for n in e.names}
    biases = {n + ".bias" for e in entries for n in e.names}  # a packed linear's bias is written in float32
    fixed = sum(
        math.prod(shape) * (4 if name in biases else model_io.SAFETENSORS_DTYPES.get(dtype, 4))
        for name, (_, dtype, shape) in index.items()
        if name not in quantized
    )
    left = int(budget.size_mb * 1e6) - fixed
    if left <= 0:
        raise UserError(
            f"--size-mb {budget.size_mb:g}: what stays unquantized (embeddings, norms, the head) already takes "
            f"{fixed / 1e6:.1f} MB"
        )
    return left


def choose(entries: list, budget: MixedBudget, index: dict, scheme: Scheme) -> Tuple[Dict[str, Scheme], int]:
    """({full linear name: its scheme} for every quantized linear, the bytes the budget allowed them)."""
    limit = budget_bytes(budget, entries, index)
    try:
        picks = allocate([e.candidates for e in entries], limit)
    except UserError as e:
        raise UserError(f"{budget.describe()}: {e}") from None
    return {n: scheme.with_(bits=budget.bits[j]) for e, j in zip(entries, picks) for n in e.names}, limit


def allocation_table(entries: list, chosen: Dict[str, Scheme], budget: MixedBudget, limit: int) -> List[str]:
    """Lines of a table: one row per decoder layer, one column per kind of linear set (`q_proj+k_proj+v_proj`),
    each cell the bits chosen; then the totals against the budget."""
    rows: Dict[int, Dict[str, int]] = {}
    kinds: List[str] = []
    for e in entries:
        kind = "+".join(n.rpartition(".")[2] for n in e.names)
        kinds += [kind] if kind not in kinds else []
        rows.setdefault(e.layer, {})[kind] = chosen[e.names[0]].bits
    lines = [f"mixed precision, {budget.describe()}:", "  layer  " + "  ".join(kinds)]
    for idx, cells in rows.items():
        lines.append(f"  {idx:>5}  " + "  ".join(f"{cells.get(k, '-'):>{len(k)}}" for k in kinds))
    picks = [chosen[e.names[0]].bits for e in entries]
    nbytes = sum(e.candidates[budget.bits.index(b)].nbytes for e, b in zip(entries, picks))
    count = {b: sum(len(e.names) for e, p in zip(entries, picks) if p == b) for b in budget.bits}
    lines.append(
        "  linears at "
        + ", ".join(f"{b} bits: {n}" for b, n in count.items())
        + f"; {nbytes / 1e6:.3f} MB packed of the {limit / 1e6:.3f} MB budget"
    )
    return lines
