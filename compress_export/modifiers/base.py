"""The modifier lifecycle: steps around the weight pass, with the hooks llm-compressor's modifiers have.

A modifier is planned once from the run's config (`plan`, in pipeline/plan.resolve), checked against the model's
layout before any weight is read (`check`), and then called by the pipeline at fixed points of the run, in the
plan's order:

    before_pass(ctx)                                   once, before the first decoder layer
    before_layer(ctx, i, layer, states)                layer i loaded, before the pass sees it (calibration inputs)
    before_compress(ctx, groups)                       on every rank, the groups of linears about to be
                                                       compressed ([(local names, merged statistics)])
    target_weights(ctx, names, weights, stats)         linears sharing an input about to be compressed: the
                                                       weights the pass should aim at instead (None: their own)
    after_group(ctx, names, weights, results, stats)   the pass compressed linears that share an input
    after_linear(ctx, name, result)                    one linear's final result (on the CPU, on every rank)
    refine_layer(ctx, i, layer, results) -> bool       every linear of layer i compressed (results: local name →
                                                       result, replaceable), none written yet; True: changed
    after_layer(ctx, i, layer)                         layer i compressed and written
    at_export(ctx, folder, extra)                      the export's folder being assembled, and the extras that
                                                       go into its quantization_config (key order is the plan's)

The pipeline knows nothing about any one modifier. Adding one: a file in this folder with a subclass decorated
`@register_modifier("name")`, its module listed in MODIFIERS' built-ins below, and the config field it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from compress_export.core.registry import Registry
from compress_export.core.scheme import Scheme


@dataclass(frozen=True)
class PlanContext:
    """What a modifier may decide from, once, before the run: the resolved scheme and pass, and the model."""

    scheme: Optional[Scheme]
    method: str
    model_type: str


@dataclass
class RunContext:
    """What a modifier sees of the run: the source folder, the model's layout, this process's place in a
    distributed run (pipeline/distributed.Dist: reduce_max, sum_, main) and the dtype of stored float values."""

    src: Path
    layout: Any
    dist: Any
    storage_dtype: Any = None  # the dtype the export stores float values in (the source's)


class Modifier:
    """The base: every hook does nothing. Subclasses are frozen-like (set everything in __init__)."""

    name = "modifier"  # set by register_modifier
    order = 100  # where its hooks run among the planned modifiers (lower first; see plan_modifiers)
    needs_calibration = False  # True: the run calibrates (builds calibration inputs) even for RTN
    # True: GPTQ records where each weight sat before rounding (QuantizedWeight.offsets) for refine_layer; an
    # [in, out] buffer and a write per column, so only when a modifier reads them
    needs_rounding_offsets = False

    @classmethod
    def plan(cls, config, ctx: PlanContext) -> Optional[Modifier]:
        """This modifier as `config` (a CompressionConfig) asks for it, or None when off; a UserError when it was
        asked for and cannot apply."""
        raise NotImplementedError

    def check(self, layout) -> None:
        """Before any weight is read: raise a UserError when the model's layout does not fit."""

    def before_pass(self, ctx: RunContext) -> None:
        pass

    def before_layer(self, ctx: RunContext, index: int, layer, states: Optional[list]) -> None:
        pass

    def before_compress(self, ctx: RunContext, groups: list) -> None:
        """groups: [(local names, statistics)], the statistics already merged over the ranks."""

    def target_weights(self, ctx: RunContext, names, weights, stats) -> Optional[list]:
        """What the pass compresses in place of `weights` (float [out, in] each), or None for the weights
        themselves; the modifiers' after_group sees these targets (the low-rank correction fits target − result),
        the layer keeps its own weights until the result replaces them."""
        return None

    def after_group(self, ctx: RunContext, names, weights, results, stats) -> None:
        pass

    def after_linear(self, ctx: RunContext, name: str, result) -> None:
        pass

    def refine_layer(self, ctx: RunContext, index: int, layer, results: dict) -> bool:
        """Replace entries of `results` (and set the layer's weights to match); True when anything changed, so
        the pipeline propagates the calibration states through the layer again."""
        return False

    def after_layer(self, ctx: RunContext, index: int, layer) -> None:
        pass

    def layer_note(self) -> str:
        """A few words for the progress line after each layer (a loss, a time); empty: nothing."""
        return ""

    def at_export(self, ctx: RunContext, folder: Path, extra: dict) -> None:
        pass

    def summary(self) -> dict:
        """The run summary's fields this modifier fills (pipeline.compress.Summary)."""
        return {}


MODIFIERS: Registry = Registry(
    "modifier",
    builtins=(
        "compress_export.modifiers.smoothing",
        "compress_export.modifiers.asymmetric",
        "compress_export.modifiers.lowrank",
        "compress_export.modifiers.recover",
    ),
)


def register_modifier(name: str):
    return MODIFIERS.register(name)


def plan_modifiers(config, ctx: PlanContext) -> tuple:
    """The modifiers `config` turns on, by their `order` (SmoothQuant, asymmetric calibration, the low-rank
    correction, recovery; registration order among equals): the order of their hooks and of their
    quantization_config extras. Explicit, not import order: asymmetric calibration must copy the layer after
    SmoothQuant changed it, and arm its hooks after SmoothQuant's range forwards."""
    ordered = sorted((cls for _, cls in MODIFIERS.items()), key=lambda cls: cls.order)
    planned = (cls.plan(config, ctx) for cls in ordered)
    return tuple(m for m in planned if m is not None)
