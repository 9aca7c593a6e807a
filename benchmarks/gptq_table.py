"""Perplexity, compression time, peak RSS and size of RTN, GPTQ and AWQ exports of SmolLM2 (shared protocol).

  python benchmarks/gptq_table.py [--rows gptq-w4g64,rtn-w4g64,...] [--out results.json]
  python benchmarks/gptq_table.py --rows AWQ_ROWS     # the AWQ / formats table of benchmarks/README.md

Each row runs `compress-export` and `compress-export eval` in fresh subprocesses, so peak RSS is per run.
Row names: METHOD-wBITS(gGROUP|pc)[-asym][-ACTORDER][-datafree][@FORMAT]; calibration is the first 64×512
tokens of ../shared/data/text/calib.txt unless -datafree; FORMAT defaults to gptq. `ROW>FORMAT` repacks the
export of an earlier ROW into FORMAT with `compress-export convert` (same numbers, so the same perplexity).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TEXT, example_model

DEFAULT_ROWS = ("bf16,rtn-w8pc,gptq-w8pc,rtn-w4g64,gptq-w4g64,rtn-w3g64,gptq-w3g64,rtn-w2g64,gptq-w2g64,"
                "gptq-w4g64-datafree")


def cli(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "compress_export.cli", *map(str, args), "--json"],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


AWQ_ROWS = ("bf16,rtn-w4g64-asym-none@awq,gptq-w4g64-asym-static,awq-w4g64-asym@awq,"
            "awq-w4g64-asym@awq>compressed-tensors,gptq-w4g64-static,gptq-w4g64-static>awq,"
            "gptq-w4g64-static>compressed-tensors")


def parse_row(name: str) -> list:
    m = re.fullmatch(r"(rtn|gptq|awq)-w(\d)(?:g(\d+)|pc)(-asym)?(?:-(none|static|group))?(-datafree)?"
                     r"(?:@([a-z-]+))?", name)
    if not m:
        raise SystemExit(f"bad row name {name!r}")
    method, bits, group, asym, act, datafree, fmt = m.groups()
    args = ["--method", method, "--bits", bits, "--group-size", group or "-1", "--act-order", act or "static",
            "--format", fmt or "gptq"]
    args.append("--asym" if asym else "--sym")
    if not datafree:
        args += ["--dataset", TEXT / "calib.txt"]
    return args + ["--num-samples", "64", "--seq-len", "512"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated row names, or AWQ_ROWS")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="write the results as JSON here too")
    a = p.parse_args()
    model = a.model or example_model()
    rows = AWQ_ROWS if a.rows == "AWQ_ROWS" else a.rows
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows.split(","):
            t = time.time()
            if ">" in row:
                src, fmt = row.split(">")
                target = Path(tmp) / row.replace(">", "-to-")
                subprocess.run([sys.executable, "-m", "compress_export.cli", "convert", Path(tmp) / src,
                                "--format", fmt, "-o", target], check=True, capture_output=True)
                rec = {"row": row, "seconds": round(time.time() - t, 1), "peak_rss_mb": None,
                       "size_mb": round(sum(f.stat().st_size for f in target.glob("*.safetensors")) / 1e6, 1)}
            elif row == "bf16":
                rec = {"row": row, "seconds": 0.0, "peak_rss_mb": None, "size_mb": None}
                target = model
            else:
                target = Path(tmp) / row
                s = cli(*parse_row(row), model, "-o", target, "-q")
                rec = {"row": row, "seconds": round(s["seconds"], 1), "peak_rss_mb": round(s["peak_rss_mb"]),
                       "size_mb": round(s["size_after_mb"], 1)}
            ev = cli("eval", target, "--text", TEXT / "eval.txt")
            rec.update(token_ppl=round(ev["token_perplexity"], 2), word_ppl=round(ev["word_perplexity"], 1),
                       byte_ppl=round(ev["byte_perplexity"], 4), bits_per_byte=round(ev["bits_per_byte"], 4))
            if row == "bf16":
                rec["size_mb"] = round(sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 1e6, 1)
            results.append(rec)
            print(json.dumps(rec), f"({time.time() - t:.0f} s wall)", flush=True)
    cols = ["row", "token_ppl", "word_ppl", "byte_ppl", "bits_per_byte", "seconds", "peak_rss_mb", "size_mb"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
