"""Does the export serve faster than its original in vLLM? Decode tokens/s at batch 1 and 4, each model in its
fastest dtype on this machine, side by side in one run.

  python benchmarks/vllm_speed.py [--models smollm2,1b] [--dtypes float32,bfloat16] [--repeats 5]

- smollm2: SmolLM2-135M-Instruct (bf16 on disk) against its GPTQ W4 g64 export (static act-order; 16 × 256
  calibration tokens of calib.txt: the speed does not depend on the calibration).
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


def pairs(which: list, tmp: Path):
    if "smollm2" in which:
        base = Path(example_model())
        yield (
            "SmolLM2-135M",
            base,
            export(
                base,
                tmp / "smollm2-gptq-w4g64",
                [
                    "--format",
                    "gptq",
                    "--method",
                    "gptq",
                    "--bits",
                    "4",
                    "--group-size",
                    "64",
                    "--dataset",
                    str(TEXT / "calib.txt"),
                    "--num-samples",
                    "16",
                    "--seq-len",
                    "256",
                ],
            ),
        )
    if "1b" in which:
        base = random_llama(tmp / "llama-1b")
        yield (
            "Llama-1B (random)",
            base,
            export(
                base,
                tmp / "llama-1b-rtn-w4g128",
                ["--format", "gptq", "--method", "rtn", "--bits", "4", "--group-size", "128"],
            ),
        )


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
    a = p.parse_args()
    dtypes = a.dtypes.split(",")
    batches = a.batches.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, base, out in pairs(a.models.split(","), Path(tmp)):
            rows.append((name, measure(base, dtypes, a), measure(out, dtypes, a)))
    print(f"\n{cpu_kind()} CPU; decode tokens/s, median of {a.repeats}, {a.max_tokens} new tokens per sequence\n")
    head = ["model", "run", "size MB", "dtype"] + [f"batch {b}" for b in batches] + ["kernels"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, base, ex in rows:
        for tag, m in (("original", base), ("export", ex)):
            for dt, r in m["runs"].items():
                cells = [r.get("decode_tok_s_by_batch", {}).get(b, "error") for b in batches]
                kern = ", ".join(f"{k} ×{n}" for k, n in (r.get("kernels") or {}).items()) or "dense"
                print(
                    f"| {name} | {tag} | {m['size_mb']} | {dt} | "
                    + " | ".join(map(str, cells))
                    + f" | {kern if 'error' not in r else r['error'][-120:]} |"
                )
    print("\nEach model in its fastest dtype for that batch size:\n")
    print("| model | batch | original (dtype) | export (dtype) | export / original |\n|---|---|---|---|---|")
    for name, base, ex in rows:
        for b in batches:
            (o, odt), (e, edt) = fastest(base, b), fastest(ex, b)
            if o is None or e is None:
                print(f"| {name} | {b} | – | – | a run failed |")
                continue
            print(f"| {name} | {b} | {o} ({odt}) | {e} ({edt}) | {e / o:.2f}× |")


if __name__ == "__main__":
    main()
