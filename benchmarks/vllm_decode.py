"""vLLM decode tokens/s of exports beside the bf16 model, in one run (CPU backend here, CUDA where present).

  python benchmarks/vllm_decode.py [EXPORT_DIR ...] [--max-tokens 64] [--repeats 2]

Without EXPORT_DIR it exports SmolLM2 as GPTQ W4 g64 (RTN: the speed depends on the format and kernel, not on
the calibration). Each model is loaded in its own subprocess (`compress_export.integrations.vllm_check`): greedy,
single stream, 64 new tokens after a warm-up, `ignore_eos`; the best of --repeats runs is reported.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import example_model


def check(model: str, max_tokens: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "compress_export.integrations.vllm_check", model,
                        "--max-tokens", str(max_tokens)], capture_output=True, text=True)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not line:
        return {"model": model, "error": (r.stderr or r.stdout)[-1500:]}
    return json.loads(line[0][7:])


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
            out = str(Path(tmp) / "smollm2-gptq-w4g64")
            subprocess.run([sys.executable, "-m", "compress_export.cli", "--method", "rtn", "--bits", "4",
                            "--group-size", "64", "-q", base, "-o", out], check=True, capture_output=True)
            exports = [out]
        rows = []
        for model in [base] + exports:
            runs = [check(model, a.max_tokens) for _ in range(a.repeats)]
            ok = [r for r in runs if "error" not in r]
            best = max(ok, key=lambda r: r["decode_tok_s"]) if ok else runs[0]
            rows.append(best)
            print(json.dumps(best), flush=True)
    print("\n| model | quantization | load s | decode tok/s | vs bf16 |\n|---|---|---|---|---|")
    ref = rows[0].get("decode_tok_s")
    for r in rows:
        if "error" in r:
            print(f"| {Path(r['model']).name} | error | | | |")
            continue
        print(f"| {Path(r['model']).name} | {r['quantization'] or 'none (bf16 weights, fp32 compute)'} | "
              f"{r['load_s']} | {r['decode_tok_s']} | {r['decode_tok_s'] / ref:.2f}× |")


if __name__ == "__main__":
    main()
