"""Distributed calibration: the same export with 1 and N ranks (torchrun, gloo on the CPU), timed and compared.

    python benchmarks/distributed.py                      # SmolLM2 GPTQ W4 g64, calib.txt 64×512, ranks 1 and 2
    python benchmarks/distributed.py --ranks 1 2 4 --num-samples 128

Each run is a fresh process tree: `python -m compress_export` for one rank (all cores), else
`python -m torch.distributed.run --standalone --nproc-per-node N -m compress_export` with the cores split evenly
between the ranks (OMP_NUM_THREADS = cores / N). Wall time includes start-up and loading, as a user sees it.
Every export is compared with the one-rank export: share of identical codes, the largest difference of a
dequantized weight in units of its group's scale (1.0 = one quantization step) and as a fraction of the
layer's largest weight, and token perplexity on eval.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TEXT, cli, example_model


def export(model: str, out: Path, ranks: int, args: list) -> float:
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // ranks)))
    launch = (
        [sys.executable, "-m", "compress_export"]
        if ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "compress_export",
        ]
    )
    t = time.time()
    r = subprocess.run([*launch, model, "-o", str(out), "-q", *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{ranks} rank(s) failed:\n{r.stderr[-3000:]}")
    return time.time() - t


def compare(one: Path, other: Path) -> dict:
    """Code agreement and the largest weight difference between two exports of the same model."""
    from compress_export.io.loading import read_quantized

    _, a, _ = read_quantized(one)
    _, b, _ = read_quantized(other)
    same = total = 0
    steps = rel = 0.0
    for k, qa in a.items():
        qb = b[k]
        same += (qa.codes == qb.codes).sum().item()
        total += qa.codes.numel()
        wa, wb = qa.dequantize(), qb.dequantize()
        scale = qa.scales[:, qa.g_idx.long()]
        steps = max(steps, ((wa - wb).abs() / scale).max().item())
        rel = max(rel, ((wa - wb).abs().max() / wa.abs().max()).item())
    return {
        "codes_identical": round(same / total, 6),
        "max_diff_steps": round(steps, 2),
        "max_diff_rel": float(f"{rel:.3g}"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    model = a.model or example_model()
    args = [
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        str(a.group_size),
        "--dataset",
        str(TEXT / "calib.txt"),
        "--num-samples",
        str(a.num_samples),
        "--seq-len",
        str(a.seq_len),
    ]
    ranks = sorted(set(a.ranks) | {1})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for n in ranks:
            outs[n] = Path(tmp) / f"ranks{n}"
            secs = export(model, outs[n], n, args)
            ppl = cli("eval", outs[n], "--text", TEXT / "eval.txt")["token_perplexity"]
            row = {
                "ranks": n,
                "threads_per_rank": max(1, (os.cpu_count() or 1) // n),
                "wall_s": round(secs, 1),
                "token_ppl": round(ppl, 3),
                **compare(outs[1], outs[n]),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nSmolLM2 GPTQ W4 g{a.group_size}, {a.num_samples}×{a.seq_len} calib.txt, {os.cpu_count()} cores")
    print(
        "| ranks | threads/rank | wall s | codes identical to 1 rank | max Δw (steps) | max Δw / max|w| | token ppl |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['threads_per_rank']} | {r['wall_s']} | {100 * r['codes_identical']:.3f}% | "
            f"{r['max_diff_steps']} | {r['max_diff_rel']} | {r['token_ppl']} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
