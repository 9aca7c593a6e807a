"""Can vLLM shard an export N ways (tensor parallelism)? Answered from config.json and the safetensors headers.

vLLM splits attention heads across ranks (the query heads must divide evenly; key/value heads too, or be
replicated when there are fewer of them than ranks), splits column-parallel linears (q, k, v, gate, up) along
their outputs and row-parallel linears (o, down) along their inputs, each stored tensor along the axis its
TensorSpec names. So a shard must hold whole packed words along the split axis, and a row shard of contiguous
groups must end on a group boundary. Per-channel and act-order row shards keep every group (as our plugin and
vLLM's own GPTQ method do), which always works; act-order ones run on the per-column gather kernel, which is
slower. Reads no weights (compressed-tensors' two-number `weight_shape` records are read).
"""

from __future__ import annotations

import re
from fractions import Fraction

from compress_export.core.errors import UserError
from compress_export.core.moe import expert_index
from compress_export.core.structure import KV_PROJECTIONS, ROW_PARALLEL
from compress_export.formats.base import replicated_groups, shard_replicates_groups

DEFAULT_SIZES = (1, 2, 4, 8)


def _whole_words(length: int, spec) -> bool:
    return (Fraction(length) / spec.pack_factor).denominator == 1


def linear_problems(fmt, scheme, name: str, in_f: int, out_f: int, n: int, kv_replicated: bool) -> list:
    """Why vLLM cannot split this linear n ways ([] when it can)."""
    layout = fmt.tensor_layout(scheme, in_f, out_f)
    if re.search(ROW_PARALLEL, name):
        if in_f % n:
            return [f"{in_f} inputs do not split {n} ways"]
        part = in_f // n
        groups = shard_replicates_groups(scheme, in_f, part)  # the plugin's own rule (vllm_method.create_weights)
        if groups is not None:
            layout = replicated_groups(layout, groups)
        problems = [
            f"{k} is packed along the inputs in words of {spec.pack_factor} values; a shard of {part} "
            "inputs ends inside a word"
            for k, spec in layout.items()
            if spec.packed_dim is not None and spec.packed_dim == spec.input_dim and not _whole_words(part, spec)
        ]
        if groups is None and scheme is not None and not scheme.divides(part):
            problems.append(
                f"group size {scheme.group_size} does not divide a shard's {part} inputs (groups would be cut)"
            )
        return problems
    if kv_replicated and re.search(KV_PROJECTIONS, name):
        return []  # fewer key/value heads than ranks: vLLM repeats these whole
    if out_f % n:
        return [f"{out_f} outputs do not split {n} ways"]
    part = out_f // n
    return [
        f"{k} is packed along the outputs in words of {spec.pack_factor} values; a shard of {part} outputs "
        "ends inside a word"
        for k, spec in layout.items()
        if spec.packed_dim is not None and spec.packed_dim == spec.output_dim and not _whole_words(part, spec)
    ]


def plan(path, sizes=DEFAULT_SIZES) -> dict:
    """{N: {"ok": bool, "problems": [...], "notes": [...]}} for each tensor-parallel size."""
    from compress_export.io.export_check import check_export

    # refused as eval refuses it (tensors that do not match config.json), but builds no model: an architecture
    # transformers cannot build (vLLM may know it) gets each packed linear's own layout checked
    info = check_export(path, what="OUT", lenient=True)
    p, cfg = info.path, info.config
    if not cfg.get("quantization_config"):
        raise UserError(f"{p} has no quantization_config: it is not an export")
    fmt, scheme, qcfg = info.fmt, info.scheme, cfg["quantization_config"]
    linears = info.packed  # each packed linear's shape as config.json gives it, its tensors checked against it
    heads = cfg.get("num_attention_heads") or 1
    kv = cfg.get("num_key_value_heads") or heads
    result = {}
    for n in sizes:
        problems = []
        if heads % n:
            problems.append(f"num_attention_heads {heads} does not split {n} ways")
        if (kv % n) if kv >= n else (n % kv):
            problems.append(f"num_key_value_heads {kv} neither splits {n} ways nor divides {n} (for replication)")
        seen = set()
        for name, (in_f, out_f) in linears.items():
            where = re.sub(r"\.\d+\.", ".*.", name)  # one line per kind of linear, not per layer
            mine = fmt.module_scheme(qcfg, name, scheme) if fmt is not None else scheme  # per-module overrides
            for why in linear_problems(fmt, mine, name, in_f, out_f, n, kv < n):
                if (where, why) not in seen:
                    seen.add((where, why))
                    problems.append(f"{where} [{out_f}×{in_f}]: {why}")
        notes = []
        if n > 1 and scheme is not None and scheme.act_order == "group":
            experts = [name for name in linears if expert_index(name) >= 0]
            if experts:
                problems.append(
                    f"{re.sub(r'[.][0-9]+[.]', '.*.', experts[0])} and the other MoE experts: act-order groups "
                    "span the ranks' shards, and our MoE method shards experts only with contiguous groups "
                    "(export with --act-order static or none)"
                )
            notes.append(
                "act-order: row-parallel shards hold parts of many groups and run on torch-dequant's "
                "per-column gather (slower than cpu-wna16); an export with --act-order static avoids it"
            )
        result[n] = {"ok": not problems, "problems": problems, "notes": notes}
    return result


def report_lines(path, result: dict) -> list:
    lines = [f"tensor parallelism in vLLM for {path}:"]
    for n, r in result.items():
        lines.append(f"  tp={n}: " + ("can shard" if r["ok"] else "cannot shard"))
        lines += [f"    - {why}" for why in r["problems"]] + [f"    note: {why}" for why in r["notes"]]
    return lines
