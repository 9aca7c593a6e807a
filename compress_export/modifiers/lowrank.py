"""The low-rank correction of the compression error (EoRA) as a modifier: W ≈ Q(W) + B·A, served as a LoRA adapter.

After the pass compresses a group of linears that share an input (after_group), each result gets the rank-r
factors of its error against the weight it replaces, in the eigenspace of the group's calibration Hessian (the
math and the adapter's files: io/lowrank.py). The layer then computes with the corrected weight, so later layers
calibrate on it. The factors are kept (they are small) and written as one PEFT LoRA adapter in OUT/lowrank when the
export is assembled (at_export), which also records `lowrank: {rank, adapter}` in its quantization_config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress_export.io.lowrank import (
    ADAPTER_DIR,
    check_rank,
    hessian_basis,
    lowrank_correction,
    save_adapter,
    storage_dtype,
)
from compress_export.modifiers.base import Modifier, PlanContext, RunContext, register_modifier


@register_modifier("lowrank")
class LowRank(Modifier):
    """The run's low-rank corrections: computed per linear after its weight pass, written at export."""

    order = 30

    def __init__(self, rank: int):
        self.rank, self.factors = rank, {}

    @classmethod
    def plan(cls, config, ctx: PlanContext):
        return cls(config.lowrank_rank) if config.lowrank_rank else None

    def check(self, layout) -> None:
        check_rank(self.rank, layout)

    def correct(self, result, weight: torch.Tensor, basis) -> None:
        """Set result.lora_a / lora_b from its error against the weight it replaces (basis: hessian_basis of its
        inputs), rounded to the adapter's storage dtype now, so the layer, later calibration and the file hold the
        same numbers."""
        A, B = lowrank_correction(weight.float() - result.dequantize(torch.float32), basis, self.rank)
        dt = storage_dtype(A, B)
        result.lora_a, result.lora_b = A.to(dt).float(), B.to(dt).float()

    def before_pass(self, ctx: RunContext) -> None:
        self.factors = {}  # a plan run twice writes each run's own factors

    def after_group(self, ctx: RunContext, names, weights, results, stats) -> None:
        basis = hessian_basis(getattr(stats, "H", None))  # once per group: its linears share the input
        for w, r in zip(weights, results):
            self.correct(r, w, basis)

    def after_linear(self, ctx: RunContext, name: str, result) -> None:
        self.factors[name] = (result.lora_a, result.lora_b)

    def at_export(self, ctx: RunContext, folder: Path, extra: dict) -> None:
        extra["lowrank"] = {"rank": self.rank, "adapter": ADAPTER_DIR}
        self.save(Path(folder) / ADAPTER_DIR, ctx.src)

    def save(self, folder: Path, src: Path) -> None:
        packed = {n: (a.to(storage_dtype(a, b)), b.to(storage_dtype(a, b))) for n, (a, b) in self.factors.items()}
        save_adapter(folder, packed, self.rank, src.name)

    def summary(self) -> dict:
        return {"lowrank_rank": self.rank}
