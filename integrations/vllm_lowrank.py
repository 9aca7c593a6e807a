"""The low-rank correction (OUT/lowrank) applied inside our plugin's linears, instead of as a vLLM LoRA adapter.

Why: vLLM's CPU LoRA path costs about 0.45 ms per adapted linear per step (SmolLM2 GPTQ W3 + rank 64: 5.2-7.6
against 21-29 tokens/s decode, benchmarks/lowrank.py). Fused, each linear adds y += B·(A·x) to the kernel call it
already makes, with the same perplexity. As two torch matmuls per linear on fp32 factors (B block-diagonal over a
merged linear's parts, zero blocks included) that decoded at 9.4-14.1 tokens/s; the C kernel of kernels/lowrank.py
reads fp16 factors without zero blocks in one call per linear (figures in benchmarks/README.md).

Opt-in: COMPRESS_EXPORT_LOWRANK=fused (in the environment of `compress-export serve`, `vllm serve` or the offline
LLM). The served model is then the corrected one under the export's own name; `compress-export serve` leaves out
the `corr` LoRA adapter, and passing it by hand as well would apply the correction twice. Our plugin then claims
the checkpoint even where vLLM has its own kernel, since only our linears apply the correction. One process
(tensor-parallel size 1): the factors are not sharded.

Fused linears (q/k/v, gate/up) hold one module's pair per part: A is the parts' A stacked [Σr, in], and each
corrected part its own B_p [out_p, r_p] writing only its columns (kernels/lowrank.py, one kernel call for all
parts). A part the adapter does not correct has no block.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

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


def _parts(
    factors: dict, prefix: str, parts: Sequence[str], sizes: Sequence[int], in_f: int
) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
    """(first output column, A [r, in_f], B [size, r]) for each part of the linear at `prefix` that the adapter
    corrects; its output concatenates `parts` (module names, as in the model's packed_modules_mapping; [] when it is
    one module) of `sizes` rows. The pairs used are removed from `factors`, so what is left was never applied."""
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
    out, col = [], 0
    for name, size, f in zip(names, sizes, found):
        if f is not None:
            a, b = f
            if a.shape[1] != in_f or b.shape[0] != size:
                raise ValueError(
                    f"{parent}.{name}: the low-rank pair is {tuple(b.shape)}·{tuple(a.shape)} but the "
                    f"linear is {size}×{in_f}: OUT/lowrank is not this export's correction "
                    f"(re-export with --lowrank-rank, or unset {ENV})"
                )
            out.append((col, a, b))
        col += size
    return out


def fused_pair(
    factors: dict, prefix: str, parts: Sequence[str], sizes: Sequence[int], in_f: int, dtype: torch.dtype
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(A [Σr, in_f], B [Σsizes, Σr]): the parts' A stacked and the block-diagonal B (zero blocks included) that
    sends each part's rank block to its own rows; None when the adapter corrects none of the parts (see _parts).
    One pair of plain matmuls: the reference the fused kernel (fused_factors) is tested against."""
    blocks = _parts(factors, prefix, parts, sizes, in_f)
    if not blocks:
        return None
    rank = sum(a.shape[0] for _, a, _ in blocks)
    A = torch.zeros(rank, in_f, dtype=dtype)
    B = torch.zeros(sum(sizes), rank, dtype=dtype)
    r0 = 0
    for col, a, b in blocks:
        A[r0 : r0 + a.shape[0]] = a.to(dtype)
        B[col : col + b.shape[0], r0 : r0 + a.shape[0]] = b.to(dtype)
        r0 += a.shape[0]
    return A, B


def fused_factors(factors: dict, prefix: str, parts: Sequence[str], sizes: Sequence[int], in_f: int):
    """The linear's correction in the fused kernel's layout (kernels/lowrank.py: A stacked, one B block per
    corrected part, no zero blocks, 16-bit), or None when the adapter corrects none of its parts (see _parts)."""
    from compress_export.kernels.lowrank import pack

    blocks = _parts(factors, prefix, parts, sizes, in_f)
    return pack(prefix, blocks, sum(sizes), in_f) if blocks else None
