"""How far does W8A8 perplexity move when the activations differ in their last fp32 bits?

  python benchmarks/w8a8_noise.py [--export DIR] [--eps 1e-7,1e-6] [--seeds 3]

Why: vLLM with our plugin and our own loader run the same int8 kernel on the same export, yet their eval.txt
perplexities differ by 0.07-0.2% (benchmarks/README.md, W8A8). The two engines compute the activations with
different fp32 kernels (norms, attention, rotary), so their inputs to each linear differ by rounding, and per-token
int8 quantization turns a value that sits at a rounding boundary into a different code. This script reproduces that
in one engine: our loader, with every W8A8 linear's input multiplied by (1 + eps·N(0, 1)) before it is quantized
(eps 1e-7 is about fp32's rounding; 1e-6 ten times it), seeded, and the perplexity spread across seeds. If that
spread covers the engines' gap, the gap is rounding, not a difference in arithmetic.

Without --export, SmolLM2 is exported RTN + SmoothQuant 0.5 W8A8 (calibrated on calib.txt 64 × 512, as
benchmarks/w8a8.py's rtn-sq row). Perplexity: eval.txt, the shared protocol (16 × 512, fp32).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import TEXT, cli, example_model

import compress_export.kernels.int8 as int8
from compress_export.io.loading import load_model
from compress_export.pipeline.evaluate import perplexity


def perturbed_ppl(model, tok, text: str, eps: float, seed: int) -> float:
    """Token perplexity with each int8 linear's input perturbed by relative noise eps (0: none)."""
    exact, gen = int8.w8a8_linear, torch.Generator().manual_seed(seed)

    def noisy(x, weight, scale):
        return exact(x * (1 + eps * torch.randn(x.shape, generator=gen)), weight, scale)

    int8.w8a8_linear = noisy if eps else exact  # the int8 kernel looks this name up at each call
    try:
        with torch.no_grad():
            return perplexity(model, tok, text).as_dict()["token_perplexity"]
    finally:
        int8.w8a8_linear = exact


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", help="a W8A8 export (default: SmolLM2 RTN + SmoothQuant, made here)")
    p.add_argument("--eps", default="1e-7,1e-6", help="comma-separated relative noise levels")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    text = (TEXT / "eval.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(a.export) if a.export else Path(tmp) / "w8a8"
        if not a.export:
            cli(
                "--scheme",
                "W8A8",
                "--method",
                "rtn",
                "--smoothquant",
                "0.5",
                "--dataset",
                TEXT / "calib.txt",
                "--num-samples",
                "64",
                "--seq-len",
                "512",
                example_model(),
                "-o",
                export,
                "-q",
            )
        model, tok = load_model(export)
        base = perturbed_ppl(model, tok, text, 0.0, 0)
        print(f"{export.name}: eval.txt token ppl {base:.3f} unperturbed\n")
        print("| eps | seed | token ppl | vs unperturbed |\n|---|---|---|---|")
        for eps in (float(e) for e in a.eps.split(",")):
            for seed in range(a.seeds):
                got = perturbed_ppl(model, tok, text, eps, seed)
                print(f"| {eps:g} | {seed} | {got:.3f} | {100 * (got / base - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
