"""Calibration sources compared: time to make the set, its share of the compress run, and the perplexity it gives.

  python benchmarks/calibration.py [--sources calib,builtin,self] [--sizes 32x256,64x512] [--slow]

SmolLM2 GPTQ W4 g64 (symmetric, static act-order, as gptq_table.py's gptq-w4g64 row) calibrated on:
  calib    the first N×L tokens of ../shared/data/text/calib.txt (the benchmarks' usual calibration);
  builtin  the default without --dataset: the built-in text shipped in compress_export/data/calibration.txt;
  self     --dataset self, the model writing its own text (the old default; slow, so it runs only at 32x256,
           the README demo's size, unless --slow is given).
Each export runs `compress-export ... --json` and is scored by `compress-export eval` on eval.txt in fresh
processes (the shared protocol, as common.measure_rows does). Rows are merged into
benchmarks/results/calibration.txt by (source, size), so runs can be done piecewise; that file keeps the table
and the raw records.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import ROOT, TEXT, cli, example_model

RESULTS = ROOT / "benchmarks" / "results" / "calibration.txt"
DEMO_SIZE = "32x256"
GPTQ_W4G64 = [
    "--method",
    "gptq",
    "--format",
    "gptq",
    "--bits",
    "4",
    "--group-size",
    "64",
    "--sym",
    "--act-order",
    "static",
]
SOURCES = {"calib": ["--dataset", TEXT / "calib.txt"], "builtin": [], "self": ["--dataset", "self"]}
COLS = [
    "source",
    "size",
    "calibration_s",
    "compress_s",
    "calibration_pct",
    "token_ppl",
    "word_ppl",
    "vs_calib",
    "load1",
]


def run(model: str, source: str, size: str) -> dict:
    n, seq = size.split("x")
    load1 = os.getloadavg()[0]  # the machine is shared: a busy one inflates every time in the row
    with tempfile.TemporaryDirectory() as tmp:
        s = cli(*GPTQ_W4G64, *SOURCES[source], "--num-samples", n, "--seq-len", seq, model, "-o", Path(tmp) / "o", "-q")
        ev = cli("eval", Path(tmp) / "o", "--text", TEXT / "eval.txt")
    calib = s["timings"]["calibration_data"]
    return {
        "source": source,
        "size": size,
        "calibration_s": round(calib, 1),
        "compress_s": round(s["seconds"], 1),
        "calibration_pct": round(100 * calib / s["seconds"], 1),
        "token_ppl": round(ev["token_perplexity"], 2),
        "word_ppl": round(ev["word_perplexity"], 1),
        "load1": round(load1, 2),
        "calibration": s["calibration"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def read_records() -> list:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.startswith("{")]


def table(records: list) -> str:
    """Markdown table; vs_calib: token ppl relative to calib.txt at the same size (target: within +3%)."""
    calib = {r["size"]: r["token_ppl"] for r in records if r["source"] == "calib"}
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in records:
        ref = calib.get(r["size"])
        r = {**r, "vs_calib": f"{100 * (r['token_ppl'] / ref - 1):+.1f}%" if ref and r["source"] != "calib" else "–"}
        lines.append("| " + " | ".join(str(r.get(c, "–")) for c in COLS) + " |")
    return "\n".join(lines)


def write(records: list) -> None:
    order = {name: i for i, name in enumerate(SOURCES)}
    records.sort(key=lambda r: (int(r["size"].split("x")[0]) * int(r["size"].split("x")[1]), order[r["source"]]))
    RESULTS.write_text(
        "SmolLM2-135M-Instruct, GPTQ W4 g64 (sym, static act-order), by calibration source (benchmarks/calibration.py)."
        "\ncalibration_s: making the calibration set (timings.calibration_data); compress_s: the whole run (load to"
        "\nwritten checkpoint); token/word ppl: compress-export eval on eval.txt (shared protocol); vs_calib: token"
        "\nppl against calib.txt at the same size; load1: the 1-minute load average when the row started (2 cores).\n\n"
        + table(records)
        + "\n\nRaw records (the script merges reruns by source and size):\n"
        + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default=",".join(SOURCES), help="comma-separated: calib, builtin, self")
    p.add_argument("--sizes", default=f"{DEMO_SIZE},64x512", help="comma-separated SAMPLESxSEQ_LEN")
    p.add_argument("--slow", action="store_true", help="run `self` at every size, not only at 32x256")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    a = p.parse_args()
    model = a.model or example_model()
    records = read_records()
    for size in a.sizes.split(","):
        for source in a.sources.split(","):
            if source not in SOURCES:
                raise SystemExit(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
            if source == "self" and size != DEMO_SIZE and not a.slow:
                print(f"skipping self at {size} (about 10 minutes of generation; --slow runs it)", flush=True)
                continue
            t = time.time()
            rec = run(model, source, size)
            print(json.dumps(rec, ensure_ascii=False), f"({time.time() - t:.0f} s wall)", flush=True)
            records = [r for r in records if (r["source"], r["size"]) != (source, size)] + [rec]
            write(records)
    print("\n" + table(records))


if __name__ == "__main__":
    main()
