"""transformers `generate` speed and resident weight memory: the SmolLM2 W4 export loaded with
AutoCompressedModelForCausalLM against the 16-bit model loaded with AutoModelForCausalLM, in the same run.

  python benchmarks/transformers_speed.py [EXPORT_DIR] [--dtypes bfloat16,float32] [--repeats 5] [--max-new-tokens 64]

Without EXPORT_DIR it writes SmolLM2's GPTQ W4 g64 export (static act-order, 16 × 256 tokens of calib.txt) to a
temporary folder. Each model is loaded once per dtype in this process; decode tokens/s at batch 1 is greedy
generation of --max-new-tokens after a short prompt (median of --repeats, after a warm-up); resident weight memory
counts every distinct tensor the model holds (parameters, buffers and the kernels' packed tensors, tied weights
once: compress_export.kernels.linear.weight_bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TEXT, example_model

from compress_export import AutoCompressedModelForCausalLM
from compress_export.core.hardware import cpu_kind
from compress_export.kernels.linear import weight_bytes


@torch.no_grad()
def decode_speed(model, tok, new_tokens: int, repeats: int) -> float:
    ids = tok("The capital of France is", return_tensors="pt")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(**ids, **kw)
        rates.append((out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t))
    return round(statistics.median(rates), 2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", nargs="?")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = example_model()
    tok = AutoTokenizer.from_pretrained(base)
    with tempfile.TemporaryDirectory() as tmp:
        export = a.export
        if export is None:
            export = str(Path(tmp) / "smollm2-gptq-w4g64")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "compress_export.cli.main",
                    "--format",
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
                    "-q",
                    base,
                    "-o",
                    export,
                ],
                check=True,
                capture_output=True,
            )
        rows = []
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            for tag, load in (
                ("original", lambda: AutoModelForCausalLM.from_pretrained(base, dtype=dtype)),
                ("export", lambda: AutoCompressedModelForCausalLM.from_pretrained(export, dtype=dtype)),
            ):
                model = load().eval()
                r = {
                    "model": tag,
                    "dtype": dt,
                    "weights_mb": round(weight_bytes(model) / 1e6, 1),
                    "decode_tok_s": decode_speed(model, tok, a.max_new_tokens, a.repeats),
                }
                rows.append(r)
                print(json.dumps(r), flush=True)
                del model
    print(
        f"\n{cpu_kind()} CPU, {torch.get_num_threads()} threads; batch 1, {a.max_new_tokens} new tokens, "
        f"median of {a.repeats}\n"
    )
    print("| model | dtype | resident weights MB | decode tok/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['weights_mb']} | {r['decode_tok_s']} |")
    ref = next((r for r in rows if r["model"] == "original" and r["dtype"] == "bfloat16"), None)
    if ref:
        for r in rows:
            if r["model"] == "export":
                print(
                    f"\nexport in {r['dtype']} against the bf16 model: weights {r['weights_mb'] / ref['weights_mb']:.2f}×,"
                    f" decode {r['decode_tok_s'] / ref['decode_tok_s']:.2f}×"
                )


if __name__ == "__main__":
    main()
