"""The seed paper's experiment on SmolLM2 in one command: GPTQ at 2, 3, 4 and 8 bits against the 16-bit model.

  python benchmarks/seed_table.py [--rows NAME,...] [--out-dir DIR] [--max-tokens 32]

Group size 64 (the paper's 128 does not divide SmolLM2's 576), asymmetric min-max grid as in the paper (written
as compressed-tensors, where a zero point may be 0), static act-order, 64 × 512 calibration tokens of
../shared/data/text/calib.txt; RTN at the same widths, AWQ W4 and the 2:4 variants (magnitude, SparseGPT,
SparseGPT + W4) as extra rows. Per row: word perplexity, byte perplexity and
bits per byte on the shared protocol (16 × 512 tokens of eval.txt, our loader; vLLM computes the same numbers:
tests/test_validate.py), compression seconds, size on disk, and vLLM decode tokens/s (greedy, batch 1, after a
warm-up; each model in its own subprocess). Writes seed_table.json, seed_table.md and seed_table.png (word
perplexity against size) to --out-dir (default: the current directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, TEXT, example_model, measure_rows
from gptq_table import parse_row
from vllm_decode import check

CAL = ["--dataset", TEXT / "calib.txt", "--num-samples", "64", "--seq-len", "512"]
SPARSE = {
    "magnitude-2:4": ["--method", "magnitude", "--sparsity", "2:4"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--sparsity", "2:4", *CAL],
    "sparsegpt-2:4-w4g64": [
        "--method",
        "sparsegpt",
        "--sparsity",
        "2:4",
        "--bits",
        "4",
        "--group-size",
        "64",
        "--asym",
        *CAL,
    ],
}
CT = "@compressed-tensors"  # zero points may be 0 there (GPTQ v1 stores zero − 1, so it needs zero ≥ 1)
DEFAULT_ROWS = ",".join(
    ["bf16"]
    + [f"{m}-w{b}g64-asym{CT}" for m in ("gptq", "rtn") for b in (8, 4, 3, 2)]
    + ["awq-w4g64-asym@awq", *SPARSE]
)
COLS = ["row", "word_ppl", "byte_ppl", "bits_per_byte", "token_ppl", "seconds", "size_mb", "vllm_decode_tok_s"]


def spec(row: str):
    if row == "bf16":
        return None
    return SPARSE[row] if row in SPARSE else parse_row(row)


def plot(rows: list, path) -> None:
    """Word perplexity against size: one line per method across bit widths, one marker per other row."""
    import re

    sys.path.insert(0, str(ROOT))
    from compress_export.integrations.report import plot_series

    series = {}
    for r in rows:
        m = re.fullmatch(r"(gptq|rtn)-w(\d)g64-asym.*", r["row"])
        name, label = (f"{m.group(1).upper()} (g64, asym)", f"W{m.group(2)}") if m else (r["row"], None)
        series.setdefault(name, []).append((r["size_mb"], r["word_ppl"], label))
    plot_series(series, path, "SmolLM2-135M: word perplexity vs size (shared protocol)", ylabel="word perplexity")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out-dir", default=".")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per vLLM decode measurement")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM decode column")
    p.add_argument("--plot-only", metavar="JSON", help="redraw seed_table.png from a seed_table.json")
    a = p.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot_only:
        plot(json.loads(Path(a.plot_only).read_text()), out / "seed_table.png")
        return

    def decode(target, rec):
        if a.no_vllm:
            return
        r = check(str(target), a.max_tokens)
        rec["vllm_decode_tok_s"] = r.get("decode_tok_s", "error")

    rows = measure_rows(
        a.model or example_model(),
        [(r, spec(r)) for r in a.rows.split(",")],
        out / "seed_table.json",
        after=decode,
        cols=COLS,
    )
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(str(r.get(c, "–")) for c in COLS) + " |" for r in rows]
    (out / "seed_table.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "seed_table.png")
    print(json.dumps({"wrote": [str(out / f) for f in ("seed_table.json", "seed_table.md", "seed_table.png")]}))


if __name__ == "__main__":
    main()
