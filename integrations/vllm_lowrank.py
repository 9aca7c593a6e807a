"""The low-rank correction (OUT/lowrank) applied inside our plugin's linears, instead of as a vLLM LoRA adapter.

Why: vLLM's CPU LoRA path costs about 0.45 ms per adapted linear per step (SmolLM2 GPTQ W3 +
rank 64: 5.2-7.6 against 21-29 tokens/s decode, benchmarks/lowrank.py). Fused, each linear adds two small products,
y = Q(W)·x + B·(A·x), to the kernel call it already makes: 9.4-14.1 tokens/s with the same perplexity. The
factors are not small (rank 64 here: 117 MB a token in fp32 with B's zero blocks), so it is not free either.

Opt-in: COMPRESS_EXPORT_LOWRANK=fused (in the environment of `compress-export serve`, `vllm serve` or the offline
LLM). The served model is then the corrected one under the export's own name; `compress-export serve` leaves out
the `corr` LoRA adapter, and passing it by hand as well would apply the correction twice. Our plugin then claims
the checkpoint even where vLLM has its own kernel, since only our linears apply the correction. One process
(tensor-parallel size 1): the factors are not sharded.

Fused linears (q/k/v, gate/up) hold one module's pair per part: A is the parts' A stacked [Σr, in], and B the
block-diagonal [Σout, Σr] that sends each part's rank block to its own rows, so one pair of matmuls serves all
parts. A part the adapter does not correct has no block.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from compress_export.core import settings
from compress_export.core.errors import UserError

ENV = "COMPRESS_EXPORT_LOWRANK"

log = logging.getLogger("compress_export.vllm")


def fused_requested() -> bool:
    return settings.get("LOWRANK") == "fused"  # lora (default): the adapter stays a LoRA; a bad value is an error


def served_lora(model_dir, wanted: bool = True) -> Optional[Path]:
    """The export's OUT/lowrank to attach to vLLM as a LoRA: None when it has none, when it is not wanted, or when
    it is fused (our plugin applies it then; a LoRA as well would apply it twice). Asking for the export without
    its correction while it is fused is an error: the plugin would still apply it."""
    from compress_export.io.lowrank import ADAPTER_DIR
    from compress_export.io.model_io import read_config

    folder = Path(model_dir) / ADAPTER_DIR
    if not (folder / "adapter_config.json").is_file():
        return None
    if fused_requested():
        if not wanted:
            raise UserError(
                f"{ENV}=fused applies {folder} inside our plugin's linears; set {ENV}=lora (or unset "
                "it) to run this export without its correction"
            )
        if not (Path(model_dir) / "config.json").is_file() or "quantization_config" not in read_config(model_dir):
            raise UserError(
                f"{ENV}=fused: {model_dir} has no quantization_config, so vLLM runs it without our "
                f"plugin and nothing would apply {folder}; unset {ENV} to serve it as a LoRA"
            )
        return None
    return folder if wanted else None


def check_no_lora(lora) -> None:
    """A LoRA adapter on an engine whose linears already apply the fused correction would add it twice."""
    if lora and fused_requested():
        raise UserError(
            f"{ENV}=fused applies the export's correction inside our plugin's linears; do not also "
            f"attach {lora} as a LoRA (unset {ENV}, or drop the adapter)"
        )


def _model_dir() -> Path:
    from compress_export.integrations.vllm_api import get

    return Path(get("get_current_vllm_config")().model_config.model)


def read_factors(model_dir: Optional[Path] = None) -> dict:
    """{module name: (A [r, in], B [out, r] with the scaling folded in)} of the export's OUT/lowrank."""
    from compress_export.io.lowrank import ADAPTER_DIR, read_adapter

    folder = Path(model_dir or _model_dir()) / ADAPTER_DIR
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{ENV}=fused, but {folder} holds no low-rank correction (export with --lowrank-rank R, or unset {ENV})"
        )
    factors = read_adapter(folder)[1]
    log.info("compress-export plugin: fusing the low-rank correction of %d linears from %s", len(factors), folder)
    return factors


def fused_pair(
    factors: dict, prefix: str, parts: Sequence[str], sizes: Sequence[int], in_f: int, dtype: torch.dtype
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(A [Σr, in_f], B [Σsizes, Σr]) for the linear at `prefix` whose output concatenates `parts` (module names,
    as in the model's packed_modules_mapping; [] when it is one module) of `sizes` rows; None when the adapter
    corrects none of them. The pairs used are removed from `factors`, so what is left was never applied."""
    parent, _, leaf = prefix.rpartition(".")
    names = list(parts) or [leaf]
    if len(names) == 1 and len(sizes) > 1:  # one checkpoint module split by vLLM into parts (Phi-3's qkv_proj)
        sizes = [sum(sizes)]
    if len(names) != len(sizes):
        raise ValueError(
            f"{prefix}: {len(sizes)} output parts but the model maps it to {names}; unset {ENV} "
            "to serve the correction as a LoRA"
        )
    found = [factors.pop(f"{parent}.{n}" if parent else n, None) for n in names]  # popped: leftovers are errors
    if not any(f is not None for f in found):
        return None
    rank = sum(f[0].shape[0] for f in found if f is not None)
    A = torch.zeros(rank, in_f, dtype=dtype)
    B = torch.zeros(sum(sizes), rank, dtype=dtype)
    row = r0 = 0
    for name, size, f in zip(names, sizes, found):
        if f is not None:
            a, b = f
            if a.shape[1] != in_f or b.shape[0] != size:
                raise ValueError(
                    f"{parent}.{name}: the low-rank pair is {tuple(b.shape)}·{tuple(a.shape)} but the "
                    f"linear is {size}×{in_f}: OUT/lowrank is not this export's correction "
                    f"(re-export with --lowrank-rank, or unset {ENV})"
                )
            A[r0 : r0 + a.shape[0]] = a.to(dtype)
            B[row : row + size, r0 : r0 + a.shape[0]] = b.to(dtype)
            r0 += a.shape[0]
        row += size
    return A, B
