"""Which symmetric grid: GPTQ's 2·amax/(2^b − 1), or the group's signed extreme on the lowest code (llama.cpp's Q4_0,
our symmetric grid below 8 bits since 2026-12-07). Perplexity on three texts, both parts in one run.

  python benchmarks/symmetric_grid.py [--parts rtn,gptq] [--out FILE.json]

Texts (token perplexity by the shared protocol, 16 × 512 windows): eval.txt; the built-in text's held-out half B
(modern English, another domain); and the dev split, calib.txt after its first 60% (the calibration tokens are its
first ~18%). The choice was made on B and dev; eval.txt is reported, never used to choose.

- rtn: SmolLM2-135M's decoder linears rounded to nearest in memory, W4 g64 and W3 g64, under four grids (the embedding
  and head stay as they are, as in every export): `gptq` (scale 2·amax/(2^b − 1), zero 2^(b−1): both ends half a
  step off the grid), `extreme` (what compress_export.math.quant.rtn_quantize does now: scale = the group's signed
  extreme / −2^(b−1), negative where that extreme is positive), `positive` (the extreme on the grid with a positive
  scale only: amax/2^(b−1) when it is negative, amax/(2^(b−1) − 1) when positive), and `asym` (min-max with a zero
  point, one more number a group, for reference).
- gptq: `compress-export --format gptq --method gptq --bits B --group-size 64` on calib.txt's first 64 × 512 tokens
  (the defaults: static act-order, asymmetric calibration), B = 4 and 3, with the grid the code has now. The same
  exports under GPTQ's grid are the rows of benchmarks/asymmetric.py measured before the change (README).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from calibration_domain import halves
from common import TEXT, cli, example_model, measure_rows

from compress_export.core.scheme import Scheme
from compress_export.io.calibration import builtin_text
from compress_export.math.quant import rtn_quantize

CONFIGS = ((4, 64), (3, 64))


def texts(tmp: Path) -> dict:
    calib = (TEXT / "calib.txt").read_text(encoding="utf-8")
    paths = {"eval.txt": TEXT / "eval.txt", "B": tmp / "builtin_b.txt", "dev": tmp / "dev.txt"}
    paths["B"].write_text(halves(builtin_text())[1], encoding="utf-8")
    paths["dev"].write_text(calib[int(len(calib) * 0.6) :], encoding="utf-8")
    return paths


def grid(W: torch.Tensor, bits: int, gs: int, kind: str) -> torch.Tensor:
    """W [out, in] rounded to nearest on `kind`'s grid, groups of gs consecutive columns; dequantized, float32."""
    if kind == "extreme":
        return rtn_quantize(W, Scheme(bits, gs)).dequantize().float()
    half, maxq = 1 << (bits - 1), (1 << bits) - 1
    w = W.float().reshape(W.shape[0], -1, gs)
    amax = w.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    if kind == "asym":
        lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
        s = ((hi - lo) / maxq).clamp(min=1e-8)
        z = (-lo / s).round()
    else:
        z = torch.full_like(amax, float(half))
        if kind == "gptq":
            s = 2 * amax / maxq
        else:  # positive: the extreme on code 0 when negative, on the top code when positive
            extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))
            s = torch.where(extreme < 0, amax / half, amax / (half - 1))
    s = s.half().float()  # every format stores fp16 scales
    q = ((w / s).round() + z).clamp(0, maxq)
    return ((q - z) * s).reshape(W.shape)


def rtn_part(model_dir: str, paths: dict) -> list:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress_export.pipeline.evaluate import perplexity

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    words = {k: p.read_text(encoding="utf-8") for k, p in paths.items()}
    rows = []
    for bits, gs in [(16, 0), *CONFIGS]:
        for kind in ("none",) if bits == 16 else ("gptq", "extreme", "positive", "asym"):
            t = time.time()
            with torch.no_grad():
                for n, m in linears.items():
                    m.weight.copy_(original[n] if bits == 16 else grid(original[n], bits, gs, kind))
            rec = {"row": "bf16" if bits == 16 else f"RTN W{bits} g{gs} {kind}"}
            for k, text in words.items():
                rec[k] = round(perplexity(model, tok, text).token_perplexity, 3)
            rows.append(rec)
            print(json.dumps(rec), f"({time.time() - t:.0f} s)", flush=True)
    return rows


def gptq_part(model_dir: str, paths: dict, label: str = "", configs=CONFIGS) -> list:
    """GPTQ rows (bits, group size) with the defaults, named `label`gptq-wBgG, on eval.txt, B and dev."""
    data = ["--dataset", TEXT / "calib.txt", "--num-samples", 64, "--seq-len", 512]

    def more(target, rec):
        for k in ("B", "dev"):
            rec[k] = round(cli("eval", target, "--text", paths[k])["token_perplexity"], 3)

    specs = [
        (f"{label}gptq-w{b}g{gs}", ["--format", "gptq", "--method", "gptq", "--bits", b, "--group-size", gs, *data])
        for b, gs in configs
    ]
    return measure_rows(model_dir, specs, after=more, cols=["row", "token_ppl", "B", "dev", "seconds", "size_mb"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="rtn,gptq")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="also write the rows here as JSON")
    a = p.parse_args()
    model_dir = a.model or example_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = texts(Path(tmp))
        if "rtn" in a.parts.split(","):
            rows += rtn_part(model_dir, paths)
            print("\n| row | eval.txt | B | dev |\n|---|---|---|---|")
            for r in rows:
                print(f"| {r['row']} | {r['eval.txt']} | {r['B']} | {r['dev']} |")
        if "gptq" in a.parts.split(","):
            rows += gptq_part(model_dir, paths)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
