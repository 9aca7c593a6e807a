"""vLLM decode tokens/s of exports beside the bf16 model, in one run (CPU backend here, CUDA where present).

  python benchmarks/vllm_decode.py [EXPORT_DIR ...] [--max-tokens 64] [--repeats 2]

Without EXPORT_DIR it exports SmolLM2 once per format with calibration-free passes (the speed depends on the
format and kernel, not on the calibration): RTN W4 g64 as GPTQ, AWQ and compressed-tensors, magnitude 2:4 as
sparse24, and magnitude 2:4 + W4 g64 as sparse24. Each model is loaded in its own subprocess
(`compress_export.integrations.vllm_check`): greedy, single stream, 64 new tokens after a warm-up, `ignore_eos`;
the best of --repeats runs is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import example_model, size_mb, vllm_check

W4 = ["--bits", "4", "--group-size", "64"]
DEFAULT_EXPORTS = [
    ("gptq-rtn-w4g64", ["--format", "gptq", "--method", "rtn", *W4]),
    ("awq-rtn-w4g64-asym", ["--format", "awq", "--method", "rtn", "--asym", *W4]),
    ("ct-rtn-w4g64", ["--format", "compressed-tensors", "--method", "rtn", *W4]),
    ("sparse24-magnitude", ["--format", "sparse24", "--method", "magnitude", "--sparsity", "2:4"]),
    ("sparse24-magnitude-w4g64", ["--format", "sparse24", "--method", "magnitude", "--sparsity", "2:4", *W4]),
]


def check(model: str, max_tokens: int) -> dict:
    return vllm_check(model, "--max-tokens", max_tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="*")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    base = example_model()
    with tempfile.TemporaryDirectory() as tmp:
        exports = a.exports
        if not exports:
            exports = []
            for name, args in DEFAULT_EXPORTS:
                out = str(Path(tmp) / name)
                subprocess.run(
                    [sys.executable, "-m", "compress_export.cli.main", *args, "-q", base, "-o", out],
                    check=True,
                    capture_output=True,
                )
                exports.append(out)
        rows = []
        for model in [base] + exports:
            runs = [check(model, a.max_tokens) for _ in range(a.repeats)]
            ok = [r for r in runs if "error" not in r]
            best = max(ok, key=lambda r: r["decode_tok_s"]) if ok else runs[0]
            best["size_mb"] = size_mb(model)
            rows.append(best)
            print(json.dumps(best), flush=True)
    print("\n| model | quantization | size MB | load s | decode tok/s | vs bf16 |\n|---|---|---|---|---|---|")
    ref = rows[0].get("decode_tok_s")
    for r in rows:
        if "error" in r:
            print(f"| {Path(r['model']).name} | error | {r['size_mb']} | | | |")
            continue
        print(
            f"| {Path(r['model']).name} | {r['quantization'] or 'none (bf16 weights, fp32 compute)'} | "
            f"{r['size_mb']} | {r['load_s']} | {r['decode_tok_s']} | {r['decode_tok_s'] / ref:.2f}× |"
        )


if __name__ == "__main__":
    main()
