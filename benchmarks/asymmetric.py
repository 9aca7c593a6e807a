"""Asymmetric calibration (GPTAQ, `--asymmetric ALPHA`): perplexity with and without it, on two domains.

  python benchmarks/asymmetric.py [--rows NAME,...] [--alpha A] [--out FILE.json]

SmolLM2-135M-Instruct, calibrated on the first 64×512 tokens of calib.txt (the shared protocol), token perplexity
by the shared protocol (16 × 512 windows) on eval.txt and on the built-in text's held-out half B (modern English,
another domain than the Shakespeare of calib.txt and eval.txt). Each pair of rows is the same export with
`--asymmetric 0` (GPTQ's / SparseGPT's own target) and with the default α (or --alpha). α itself was chosen on a
dev split (calib.txt after its first 60%), never on eval.txt.
"""

from __future__ import annotations

import argparse

from calibration_domain import measure_on_two_domains
from common import TEXT, example_model

from compress_export.modifiers.asymmetric import DEFAULT_ALPHA

ROWS = "bf16,gptq-w4g64,gptq-w4g64+asym,gptq-w3g64,gptq-w3g64+asym,sparsegpt-2of4,sparsegpt-2of4+asym"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=ROWS)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="α of the +asym rows (default: the default)")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="also write the rows here as JSON")
    a = p.parse_args()
    model = example_model() if not a.model else a.model
    data = ["--dataset", TEXT / "calib.txt", "--num-samples", 64, "--seq-len", 512]
    base = {
        "gptq-w4g64": ["--format", "gptq", "--method", "gptq", "--bits", 4, "--group-size", 64, *data],
        "gptq-w3g64": ["--format", "gptq", "--method", "gptq", "--bits", 3, "--group-size", 64, *data],
        "sparsegpt-2of4": ["--method", "sparsegpt", "--sparsity", "2:4", *data],
    }
    specs: dict = {"bf16": None}
    for name, args in base.items():
        specs[name] = [*args, "--asymmetric", 0]
        specs[name + "+asym"] = [*args, "--asymmetric", a.alpha]
    measure_on_two_domains(model, [(r, specs[r]) for r in a.rows.split(",")], a.out)


if __name__ == "__main__":
    main()
