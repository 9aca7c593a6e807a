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
import re

from common import TEXT, example_model, measure_rows

DEFAULT_ROWS = (
    "bf16,rtn-w8pc,gptq-w8pc,rtn-w4g64,gptq-w4g64,rtn-w3g64,gptq-w3g64,rtn-w2g64,gptq-w2g64,gptq-w4g64-datafree"
)
AWQ_ROWS = (
    "bf16,rtn-w4g64-asym-none@awq,gptq-w4g64-asym-static,awq-w4g64-asym@awq,"
    "awq-w4g64-asym@awq>compressed-tensors,gptq-w4g64-static,gptq-w4g64-static>awq,"
    "gptq-w4g64-static>compressed-tensors"
)


def parse_row(name: str) -> list:
    m = re.fullmatch(
        r"(rtn|gptq|awq)-w(\d)(?:g(\d+)|pc)(-asym)?(?:-(none|static|group))?(-datafree)?"
        r"(?:@([a-z-]+))?",
        name,
    )
    if not m:
        raise SystemExit(f"bad row name {name!r}")
    method, bits, group, asym, act, datafree, fmt = m.groups()
    args = [
        "--method",
        method,
        "--bits",
        bits,
        "--group-size",
        group or "-1",
        "--act-order",
        act or "static",
        "--format",
        fmt or "gptq",
    ]
    args.append("--asym" if asym else "--sym")
    args += ["--dataset", "self" if datafree else TEXT / "calib.txt"]  # -datafree: the model writes its own text
    return args + ["--num-samples", "64", "--seq-len", "512"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated row names, or AWQ_ROWS")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="write the results as JSON here too")
    a = p.parse_args()
    rows = (AWQ_ROWS if a.rows == "AWQ_ROWS" else a.rows).split(",")
    specs = [(r, None if r == "bf16" else ("convert", *r.split(">")) if ">" in r else parse_row(r)) for r in rows]
    measure_rows(a.model or example_model(), specs, a.out)


if __name__ == "__main__":
    main()
