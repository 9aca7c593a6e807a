"""Pass interface and registry. A pass turns weights (plus the statistics it asked for) into QuantizedWeights.

The pipeline owns hooks, ordering and memory; a pass sees one group of linears that share an input at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from compress_export.core.registry import Registry
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import Scheme

PASSES: Registry = Registry("method")
register_pass = PASSES.register


# How AWQ scores a scale candidate: "block", the output error of the attention or MLP block the balance linears sit
# in, re-run on the recorded calibration inputs (AutoAWQ, llm-compressor); "linear", the balance linears' own
# output error from the Hessian (no re-run: 9× faster on SmolLM2, 2% worse perplexity; benchmarks/awq_variants.py).
AWQ_SCORES = ("block", "linear")


@dataclass(frozen=True)
class PassOptions:
    damp: float = 0.01
    block_size: int = 128
    clip_search: bool = True
    min_zero: int = 0  # set by the pipeline from the output format's limits
    awq_score: str = "block"  # see AWQ_SCORES
    record_offsets: bool = False  # GPTQ keeps each weight's pre-rounding position (set by the plan for modifiers)


@dataclass(frozen=True)
class LinearGroup:
    """The linears of one decoder layer that read the same input (q/k/v; gate/up), compressed in one call."""

    where: str  # the layer's prefix, "model.layers.3."
    names: Tuple[str, ...]  # the members' local names, "self_attn.q_proj", ...

    @property
    def label(self) -> str:
        """For messages: "model.layers.3.self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"."""
        return self.where + "+".join(self.names)


class Pass:
    needs_calibration = True
    uses_act_order = True  # False: the pass keeps natural column order, so act_order is normalised to "none"
    # True: statistics of every linear group are gathered from the unquantized layer first, then
    # prepare_layer() runs, then groups are compressed (two forwards per layer). False: each group is
    # compressed as soon as its input is known (GPTQ's true-sequential single forward).
    layer_wise = False
    # Scheme fields this pass defaults differently when the user did not set them (AWQ: asymmetric).
    scheme_defaults: dict = {}

    # True for pruning passes: they need a sparsity pattern and may run without a scheme (no quantization).
    prunes = False

    def __init__(self, scheme: Optional[Scheme], options: PassOptions = PassOptions(), sparsity=None):
        self.scheme = scheme
        # {full linear name: its scheme} where it differs from `scheme` (mixed precision: pipeline/mixed.py)
        self.overrides: Dict[str, Scheme] = {}
        self.options = options
        self.sparsity = sparsity

    def make_stats(self, in_features: int):
        """An accumulator with .add(x) fed every input batch of a linear group, or None."""
        return None

    def check_layout(self, layout, model_type: str) -> None:
        """Raise a UserError before any work when this model's structure does not suit the pass."""

    def observe_layer(self, layer) -> list:
        """Layer-wise passes: hooks of the pass's own for the statistics forward (removed after it)."""
        return []

    def prepare_layer(self, layer, members: List[List[str]], stats: list, where: str, sum_over_ranks=None) -> None:
        """Layer-wise passes: change the layer (e.g. fold scales) and its statistics before compression.
        sum_over_ranks(t): sums t in place over distributed ranks (None in a run of one), for anything a pass
        measures on its own rank's tokens."""

    def compress_group(self, weights: List[torch.Tensor], stats, group: LinearGroup) -> List[QuantizedWeight]:
        raise NotImplementedError

    def scheme_for(self, group: LinearGroup) -> Optional[Scheme]:
        """The scheme of a group's linears: one, since they are compressed as one matrix."""
        found = {self.overrides.get(group.where + n, self.scheme) for n in group.names}
        if len(found) != 1:
            raise ValueError(f"{group.label}: linears compressed together were given different schemes {found}")
        return found.pop()

    @property
    def unseen_method(self) -> str:
        """The data-free method for_unseen runs (named in the run's warning about unrouted experts)."""
        return "magnitude" if self.sparsity is not None else "rtn"

    def for_unseen(self) -> Pass:
        """The pass for linears no calibration token reached (MoE experts the router never chose on the calibration
        set): the data-free pass at the same scheme and sparsity, so a MoE layer's experts stay one format (engines
        run a layer's experts as one fused kernel and cannot mix packed and dense ones)."""
        fallback = PASSES.get(self.unseen_method)(self.scheme, self.options, self.sparsity)
        fallback.overrides = self.overrides
        return fallback


def default_scheme(method: str) -> Scheme:
    """4-bit, automatic group size, static act-order, with the pass's own defaults (AWQ: asymmetric)."""
    return Scheme(bits=4, group_size=0, act_order="static", **PASSES.get(method).scheme_defaults)


def split_rows(qw, sizes: List[int]) -> list:
    """Undo the row concatenation of linears compressed together (all per-row data splits the same way)."""
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        mask = qw.mask[sl].contiguous() if qw.mask is not None else None
        if isinstance(qw, SparseWeight):
            out.append(SparseWeight(qw.values[sl].contiguous(), mask, qw.sparsity))
        else:
            out.append(
                QuantizedWeight(
                    qw.codes[sl].contiguous(),
                    qw.scales[sl].contiguous(),
                    qw.zeros[sl].contiguous(),
                    qw.g_idx,
                    qw.scheme,
                    mask=mask,
                    offsets=qw.offsets[sl].contiguous() if qw.offsets is not None else None,
                )
            )
        start += n
    return out
