"""Mixed precision under a size budget (`--avg-bits`): perplexity against the size-matched interpolation of the
uniform exports around it.

  python benchmarks/mixed_precision.py [--avg-bits 3.5 ...] [--out FILE.json] [--uniform-from EARLIER_OUTPUT]

SmolLM2-135M-Instruct, GPTQ g64 with the defaults (static act-order, asymmetric calibration), calibrated on the
first 64×512 tokens of calib.txt (the shared protocol); token perplexity on eval.txt and on the built-in text's
held-out half B. Rows: uniform W3 and W4, then `--avg-bits B` for each B (widths chosen from 3/4/8 by measured
sensitivity). The issue's target: at 3.5 average bits the export is as small as uniform W3.5 would be (the
budget: halfway between the W3 and W4 exports' packed bytes), and its perplexity beats the straight line between
W3 and W4 at its own size by at least 30% of the W3–W4 gap. Nothing here was tuned on eval.txt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calibration_domain import measure_on_two_domains
from common import TEXT, example_model


def _earlier_rows(path) -> dict:
    """The uniform rows of an earlier run's output (lines that start with a JSON object), printed as reused."""
    got = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            row = json.loads(line[: line.rindex("}") + 1])
            name = str(row.get("row", ""))
            if name.startswith("now-"):  # benchmarks/clip_search.py's rows of the current code
                row["row"] = name = name[len("now-") :]
            if name in ("gptq-w3g64", "gptq-w4g64"):
                row.setdefault("ppl_B", row.get("B"))  # benchmarks/symmetric_grid.py names the column B
                got[row["row"]] = {**row, "reused_from": str(path)}
                print("reused from", path, json.dumps(row), flush=True)
    return got


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--avg-bits", type=float, nargs="+", default=[3.5])
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="also write the rows here as JSON")
    p.add_argument(
        "--uniform-from",
        help="take the uniform W3/W4 rows from this earlier output (its JSON lines) instead of measuring them "
        "again: they do not depend on the mixed-precision code, and they cost half an hour",
    )
    a = p.parse_args()
    model = example_model() if not a.model else a.model
    base = ["--format", "gptq", "--method", "gptq", "--group-size", 64]
    base += ["--dataset", TEXT / "calib.txt", "--num-samples", 64, "--seq-len", 512]
    rows = [("gptq-w3g64", [*base, "--bits", 3]), ("gptq-w4g64", [*base, "--bits", 4])]
    got = _earlier_rows(a.uniform_from) if a.uniform_from else {}
    rows = [r for r in rows if r[0] not in got]
    rows += [(f"gptq-avg{b:g}g64", [*base, "--avg-bits", b]) for b in a.avg_bits]
    got.update({r["row"]: r for r in measure_on_two_domains(model, rows, a.out)})
    if a.out and a.uniform_from:  # the file holds every row the comparison used, the reused ones marked so
        Path(a.out).write_text(json.dumps(list(got.values()), indent=2), encoding="utf-8")
    w3, w4 = got["gptq-w3g64"], got["gptq-w4g64"]
    print("\nagainst the straight line between uniform W3 and W4 at the same size (share of the W3-W4 gap):")
    for b in a.avg_bits:
        r = got[f"gptq-avg{b:g}g64"]
        t = (r["size_mb"] - w3["size_mb"]) / (w4["size_mb"] - w3["size_mb"])
        for col, name in (("token_ppl", "eval.txt"), ("ppl_B", "built-in B")):
            line = w3[col] + t * (w4[col] - w3[col])
            beyond = (line - r[col]) / (w3[col] - w4[col])
            print(
                f"  --avg-bits {b:g}: {r['size_mb']} MB (at {t:.2f} of W3->W4); {name} {r[col]} against the line's "
                f"{line:.2f}: {100 * beyond:+.0f}% of the gap"
            )


if __name__ == "__main__":
    main()
