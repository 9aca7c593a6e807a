"""W4 g64 on SmolLM2: compress-export's GPTQ (one-shot, and with --recover kd) beside AutoRound 0.16.1, same scheme,
same calibration, one run.

  python benchmarks/vs_autoround.py [--iters 200] [--kd-steps 50] [--rows ours,ours+kd,autoround] [--out F.json]

AutoRound is installed into its own venv (.bench/autoround-venv, created on first use with the CPU torch this
project pins; never a dependency of ours). Every row calibrates on the first 64×512 tokens of
../shared/data/text/calib.txt, symmetric 4-bit, group 64: AutoRound gets them as token lists (its `dataset`
accepts input_ids tensors), with its own defaults otherwise (iters 200, lr 1/iters, its min-max tuning), and saves GPTQ
(`auto_gptq`); ours runs `--method gptq` with and without `--recover kd`. Each export is one subprocess timed
from start to a saved checkpoint (model load included) with its own peak RSS (wait4); all three are scored by the
same reader, our loader, on the shared protocol (eval.txt, 16 × 512 tokens), so the only difference is the
algorithm. Time figures are only comparable on a quiet machine: the script prints the CPU kind and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from common import TEXT, bench_venv, cli, example_model, size_mb
from vs_llmcompressor import run_with_rss

AUTOROUND = "auto-round==0.16.1"

AR_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound
model_dir, calib, out, iters, compile_ = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
tok = AutoTokenizer.from_pretrained(model_dir)
ids = tok(open(calib, encoding="utf-8").read(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
data = [row[None] for row in ids[: 64 * 512].view(64, 512)]  # token tensors [1, 512]: taken as they are
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ar = AutoRound(model, tok, bits=4, group_size=64, sym=True, iters=iters, nsamples=64, seqlen=512, dataset=data,
               enable_torch_compile=compile_)
ar.quantize_and_save(out, format="auto_gptq")
"""


def export_dir(out: Path) -> Path:
    """AutoRound saves into OUT or a subfolder of it, by version: the folder holding config.json."""
    found = sorted(p.parent for p in out.rglob("config.json"))
    if not found:
        raise SystemExit(f"AutoRound wrote no config.json under {out}")
    return found[0]


def machine() -> str:
    from compress_export.core.hardware import cpu_kind

    return f"{cpu_kind()} CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="ours,ours+kd,autoround")
    p.add_argument("--iters", type=int, default=200, help="AutoRound's iterations per block (its default: 200)")
    p.add_argument("--kd-steps", type=int, default=50, help="--recover-steps of the ours+kd row")
    p.add_argument("--no-compile", action="store_true", help="AutoRound without torch.compile")
    p.add_argument("--out", help="also write the rows here as JSON")
    a = p.parse_args()
    model, calib = example_model(), TEXT / "calib.txt"
    print("machine:", machine(), flush=True)
    ours = ["--format", "gptq", "--method", "gptq", "--bits", 4, "--group-size", 64]
    ours += ["--dataset", calib, "--num-samples", 64, "--seq-len", 512]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in a.rows.split(","):
            out = Path(tmp) / row.replace("+", "-")
            if row == "autoround":
                script = Path(tmp) / "ar_run.py"
                script.write_text(AR_SCRIPT)
                cmd = [
                    str(bench_venv("autoround-venv", AUTOROUND)),
                    str(script),
                    model,
                    str(calib),
                    str(out),
                    str(a.iters),
                ]
                run = run_with_rss([*cmd, "0" if a.no_compile else "1"])
                target = export_dir(out)
                label = f"AutoRound 0.16.1, iters {a.iters}"
            else:
                kd = ["--recover", "kd", "--recover-steps", a.kd_steps] if row == "ours+kd" else ["--recover", "none"]
                cmd = [sys.executable, "-m", "compress_export.cli.main", *map(str, ours + kd), "-q", model, "-o"]
                run = run_with_rss([*cmd, str(out)])
                target = out
                label = "compress-export GPTQ" + (f" + kd {a.kd_steps} steps" if row == "ours+kd" else "")
            ev = cli("eval", target, "--text", TEXT / "eval.txt")
            rec = {"row": label, **run, "size_mb": size_mb(target), "token_ppl": round(ev["token_perplexity"], 2)}
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    print("\n| export | token ppl (eval.txt) | seconds | peak RSS MB | MB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['token_ppl']} | {r['seconds']} | {r['peak_rss_mb']} | {r['size_mb']} |")
    print("machine after:", machine())
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
