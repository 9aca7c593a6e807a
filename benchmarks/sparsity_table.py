"""2:4 and unstructured pruning of SmolLM2: perplexity, time, peak RSS and size beside bf16 (shared protocol).

  python benchmarks/sparsity_table.py [--rows NAME,...] [--out results.json]

Rows: magnitude, Wanda and SparseGPT at 2:4 (sparse24 format), SparseGPT 2:4 + W4 g64 (sparse24), and 50%
unstructured for comparison (dense format). Calibration: the first 64×512 tokens of ../shared/data/text/calib.txt.
"""

from __future__ import annotations

import argparse

from common import TEXT, example_model, measure_rows

CAL = ["--dataset", TEXT / "calib.txt", "--num-samples", "64", "--seq-len", "512"]
ROWS = {
    "bf16": None,
    "magnitude-2:4": ["--method", "magnitude", "--sparsity", "2:4"],
    "wanda-2:4": ["--method", "wanda", "--sparsity", "2:4", *CAL],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--sparsity", "2:4", *CAL],
    "sparsegpt-2:4-w4g64": ["--method", "sparsegpt", "--sparsity", "2:4", "--bits", "4", "--group-size", "64", *CAL],
    "magnitude-50%": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda-50%": ["--method", "wanda", "--sparsity", "0.5", *CAL],
    "sparsegpt-50%": ["--method", "sparsegpt", "--sparsity", "0.5", *CAL],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out")
    a = p.parse_args()
    measure_rows(a.model or example_model(), [(r, ROWS[r]) for r in a.rows.split(",")], a.out)


if __name__ == "__main__":
    main()
