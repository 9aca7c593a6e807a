"""Does the export serve faster than its original in vLLM? Decode tokens/s at batch 1 and 4, each model in its
fastest dtype on this machine, side by side in one run.

  python benchmarks/vllm_speed.py [--models smollm2,1b] [--dtypes float32,bfloat16] [--repeats 5]
                                  [--variants gptq,sparse24,sparse24-w4]

- smollm2: SmolLM2-135M-Instruct (bf16 on disk) against its GPTQ W4 g64 export (static act-order; 16 × 256
  calibration tokens of calib.txt: the speed does not depend on the calibration).
- --variants adds more exports of each model (default: gptq only): `sparse24` (pruned 2:4 by magnitude, values
  in the source dtype, our sparse24 format: cpu-sparse24 runs it) and `sparse24-w4` (2:4 + W4 RTN, g64 for SmolLM2,
  g128 for 1b).
- 1b: a random-weight Llama of 1.07 B parameters (hidden 2048, 16 layers, intermediate 8192, 32/8 heads,
  SmolLM2's tokenizer) against its RTN W4 g128 export. Built in a temporary folder and deleted afterwards.

Each (model, dtype) loads once in its own process (`compress_export.integrations.vllm_check`): greedy, ignore_eos,
--max-tokens new tokens, median of --repeats runs per batch size. The ratios compare each model in its own
fastest dtype at that batch size (the baseline as a user would run it). The kernels column says what ran the
quantized linears.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import TEXT, example_model, random_llama, size_mb, vllm_check

from compress_export.core.hardware import cpu_kind


def export(base: Path, out: Path, args: list) -> Path:
    subprocess.run(
        [sys.executable, "-m", "compress_export.cli.main", *args, "-q", str(base), "-o", str(out)],
        check=True,
        capture_output=True,
    )
    return out


SMOLLM2_GPTQ = [
    *("--format", "gptq", "--method", "gptq", "--bits", "4", "--group-size", "64"),
    *("--dataset", str(TEXT / "calib.txt"), "--num-samples", "16", "--seq-len", "256"),
]
# Pruned by magnitude: the speed depends on the layout, not on which weights were kept. Values stay in the source
# dtype (bf16 for SmolLM2); the W4 variant quantizes the kept values by round to nearest.
SPARSE24 = ["--method", "magnitude", "--sparsity", "2:4"]
VARIANTS = {
    "gptq": {
        "smollm2": ("gptq-w4g64", SMOLLM2_GPTQ),
        "1b": ("rtn-w4g128", ["--format", "gptq", "--method", "rtn", "--bits", "4", "--group-size", "128"]),
    },
    "sparse24": {"smollm2": ("sparse24", SPARSE24), "1b": ("sparse24", SPARSE24)},
    "sparse24-w4": {
        "smollm2": ("sparse24-w4g64", [*SPARSE24, "--bits", "4", "--group-size", "64"]),
        "1b": ("sparse24-w4g128", [*SPARSE24, "--bits", "4", "--group-size", "128"]),
    },
}


def pairs(which: list, variants: list, tmp: Path):
    """(model name, original, [(variant, export folder), ...]) for each model asked for."""
    for key, name in (("smollm2", "SmolLM2-135M"), ("1b", "Llama-1B (random)")):
        if key not in which:
            continue
        base = Path(example_model()) if key == "smollm2" else random_llama(tmp / "llama-1b")
        outs = []
        for v in variants:
            tag, args = VARIANTS[v][key]
            outs.append((tag, export(base, tmp / f"{key}-{tag}", args)))
        yield name, base, outs


def measure(model: Path, dtypes: list, a) -> dict:
    runs = {}
    for dt in dtypes:
        r = vllm_check(
            model, "--dtype", dt, "--max-tokens", a.max_tokens, "--batches", a.batches, "--repeats", a.repeats
        )
        runs[dt] = r
        print(json.dumps({k: v for k, v in r.items() if k != "text"}), flush=True)
    return {"runs": runs, "size_mb": size_mb(model)}


def fastest(m: dict, batch: str):
    """(tokens/s, dtype) of the model's fastest dtype at this batch size, or (None, None) if every run failed."""
    ok = [(r["decode_tok_s_by_batch"][batch], dt) for dt, r in m["runs"].items() if "error" not in r]
    return max(ok) if ok else (None, None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,1b")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--variants", default="gptq", help=f"exports to compare, of {','.join(VARIANTS)}")
    a = p.parse_args()
    dtypes = a.dtypes.split(",")
    batches = a.batches.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, base, outs in pairs(a.models.split(","), a.variants.split(","), Path(tmp)):
            rows.append((name, measure(base, dtypes, a), [(tag, measure(out, dtypes, a)) for tag, out in outs]))
    print(f"\n{cpu_kind()} CPU; decode tokens/s, median of {a.repeats}, {a.max_tokens} new tokens per sequence\n")
    head = ["model", "run", "size MB", "dtype"] + [f"batch {b}" for b in batches] + ["kernels"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, base, exports in rows:
        for tag, m in (("original", base), *exports):
            for dt, r in m["runs"].items():
                cells = [r.get("decode_tok_s_by_batch", {}).get(b, "error") for b in batches]
                kern = ", ".join(f"{k} ×{n}" for k, n in (r.get("kernels") or {}).items()) or "dense"
                print(
                    f"| {name} | {tag} | {m['size_mb']} | {dt} | "
                    + " | ".join(map(str, cells))
                    + f" | {kern if 'error' not in r else r['error'][-120:]} |"
                )
    print("\nEach model in its fastest dtype for that batch size:\n")
    print(
        "| model | export | batch | original (dtype) | export (dtype) | export / original |\n|---|---|---|---|---|---|"
    )
    for name, base, exports in rows:
        for tag, ex in exports:
            for b in batches:
                (o, odt), (e, edt) = fastest(base, b), fastest(ex, b)
                if o is None or e is None:
                    print(f"| {name} | {tag} | {b} | – | – | a run failed |")
                    continue
                print(f"| {name} | {tag} | {b} | {o} ({odt}) | {e} ({edt}) | {e / o:.2f}× |")


if __name__ == "__main__":
    main()
