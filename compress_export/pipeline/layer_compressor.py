"""One decoder layer's linears through the pass, the modifiers and the format (the pipeline's inner step).

A LayerCompressor is called with groups of the layer's linears that share an input, each with its statistics.
Each group is compressed (by the rank whose turn it is, when distributed), handed to the modifiers (after_group:
the low-rank correction) and put back into the layer as the weight it computes, so later linears and layers
calibrate on the compressed function. The results wait in `results` (by local name) until `flush()` hands each to
after_linear and on_result, packs and writes it: a modifier may replace them in between (refine_layer).
"""

from __future__ import annotations

import torch

from compress_export.core.errors import UserError
from compress_export.core.moe import expert_index
from compress_export.core.result import QuantizedWeight, corrected, stored_as
from compress_export.passes import LinearGroup


class LayerCompressor:
    def __init__(
        self,
        layout,
        index: int,
        the_pass,
        format_,
        writer,
        done: set,
        on_result,
        dist,
        turns,
        modifiers=(),
        ctx=None,
        storage_dtype=torch.float16,
    ):
        self.layout, self.i, self.the_pass, self.format, self.writer = layout, index, the_pass, format_, writer
        self.done, self.on_result, self.dist, self.turns = done, on_result, dist, turns
        self.modifiers, self.ctx, self.storage_dtype = tuple(modifiers), ctx, storage_dtype
        self.mods = dict(layout.linears[index])
        self.results: dict = {}  # local name → in-memory result, until flush()
        self.unrouted: list = []  # local names of the MoE expert linears compressed without data (unseen())

    def name(self, local: str) -> str:
        return self.layout.full_name(self.i, local)

    def __call__(self, groups, the_pass=None) -> None:
        """groups: [(local names, stats), ...], compressed on every rank at once (each by its owner), by `the_pass`
        (default: the run's pass)."""
        dist = self.dist
        for m in self.modifiers if the_pass is None else ():  # every rank: a modifier may merge its statistics
            m.before_compress(self.ctx, groups)
        owners = [dist.owner(next(self.turns)) for _ in groups]
        mine = [self.sweep(*g, the_pass=the_pass) if o == dist.rank else None for g, o in zip(groups, owners)]
        for (names, _), results, o in zip(groups, mine, owners):
            self.apply(names, dist.broadcast_results(results, o))

    def unseen(self) -> None:
        """Compress the MoE expert linears calibration never reached with the pass's data-free fallback
        (Pass.for_unseen), recording their local names in `unrouted`; a second call finds none left."""
        names = [n for n in self.mods if n not in self.results and expert_index(n) >= 0]
        if names:
            self([([n], None) for n in names], the_pass=self.the_pass.for_unseen())
        self.unrouted += names

    def sweep(self, names, stats, the_pass=None) -> list:
        weights = [self.mods[n].weight for n in names]
        the_pass = the_pass or self.the_pass
        targets = weights
        for m in self.modifiers if the_pass is self.the_pass else ():  # not for the data-free fallback
            targets = m.target_weights(self.ctx, names, targets, stats) or targets
        results = the_pass.compress_group(targets, stats, LinearGroup(self.name(""), tuple(names)))
        for n, r in zip(names, results):  # NaN statistics (overflowing activations) show up here first
            check_result_finite(r, self.name(n))
        for r in results:  # float values are stored in the source dtype: round them now, so the layer, later
            stored_as(r, self.storage_dtype)  # layers' calibration and the file hold the same numbers
        for m in self.modifiers:
            m.after_group(self.ctx, names, targets, results, stats)
        for n, r in zip(names, results) if self.modifiers else ():  # what a modifier changed, checked again
            check_result_finite(r, self.name(n))
        for r in results if self.dist.active else ():  # rounding positions serve refine_layer, which torchrun
            if isinstance(r, QuantizedWeight):  # runs refuse: do not send them between ranks
                r.offsets = None
        return results

    def apply(self, names, results) -> None:
        for n, qw in zip(names, results):
            m = self.mods[n]
            qw.bias = m.bias.detach().clone() if m.bias is not None else None
            m.weight.data.copy_(corrected(qw, m.weight.dtype))
            self.results[n] = qw

    def flush(self) -> None:
        """Each final result to the modifiers, on_result and the writer, in the order they were compressed."""
        for n, qw in self.results.items():
            full = self.name(n)
            check_result_finite(qw, full)  # a refining modifier's result too
            if isinstance(qw, QuantizedWeight):
                qw.offsets = None  # transient (QuantizedWeight): no further use once the layer is final
            qw = qw.to("cpu")
            for mod in self.modifiers:
                mod.after_linear(self.ctx, full, qw)
            if self.on_result is not None:
                self.on_result(full, qw)
            for suffix, tensor in self.format.pack(qw, self.storage_dtype).items() if self.writer is not None else ():
                self.writer.add(f"{full}.{suffix}", tensor)
            self.done.add(full)
        self.results.clear()


def check_result_finite(result, name: str) -> None:
    """Stop the run, naming the layer, when a pass produced NaN or Inf (never written as an export)."""
    for what in ("scales", "values", "lora_a", "lora_b"):
        t = getattr(result, what, None)
        if t is not None and not torch.isfinite(t).all():
            raise UserError(
                f"{name}: the {what} computed for this layer hold NaN or Inf (its calibration "
                "activations overflow or the weights are extreme); nothing was written: check the "
                "source weights, or try --dataset with other text or --damp 0.1"
            )
