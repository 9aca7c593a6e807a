"""Recovery by layer-wise distillation (--recover kd): perplexity with and without it, on two domains.

  python benchmarks/recover.py [--rows NAME,...] [--steps-24 100] [--steps-w4 50] [--out FILE.json]

SmolLM2-135M-Instruct, calibrated on the first 64×512 tokens of calib.txt (the shared protocol), token perplexity
by the shared protocol (16 × 512 windows) on eval.txt and on the built-in text's held-out half B
(calibration_domain.py's split): calib.txt and eval.txt are both Shakespeare, so a gain on eval.txt alone could be
domain adaptation to the calibration text; B is modern English the training never saw.

Rows: bf16 (the model itself), the one-shot export, the same export with --recover kd. The dense control of the
issue is the bf16 row by construction: recovery distils each compressed layer towards the original layer, and an
uncompressed layer already equals it (its loss is 0 before the first step), so the same training leaves a dense
model unchanged; any gain on B over the one-shot row is therefore recovery, not domain. Every row runs GPTQ /
SparseGPT with the default asymmetric calibration (since 2026-12-07; benchmarks/asymmetric.py has the rows
without it).
"""

from __future__ import annotations

import argparse

from calibration_domain import measure_on_two_domains
from common import TEXT, example_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="bf16,sparsegpt-2of4,sparsegpt-2of4+kd,gptq-w4g64,gptq-w4g64+kd")
    p.add_argument("--steps-24", type=int, default=100, help="--recover-steps for the 2:4 row")
    p.add_argument("--steps-w4", type=int, default=50, help="--recover-steps for the W4 and W3 rows")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="also write the rows here as JSON")
    a = p.parse_args()
    model = example_model() if not a.model else a.model
    data = ["--dataset", TEXT / "calib.txt", "--num-samples", 64, "--seq-len", 512]
    s24 = ["--method", "sparsegpt", "--sparsity", "2:4", *data]
    w4 = ["--format", "gptq", "--method", "gptq", "--bits", 4, "--group-size", 64, *data]
    w3 = ["--format", "gptq", "--method", "gptq", "--bits", 3, "--group-size", 64, *data]
    specs = {
        "bf16": None,
        "sparsegpt-2of4": [*s24, "--recover", "none"],
        "sparsegpt-2of4+kd": [*s24, "--recover", "kd", "--recover-steps", a.steps_24],
        "gptq-w4g64": [*w4, "--recover", "none"],
        "gptq-w4g64+kd": [*w4, "--recover", "kd", "--recover-steps", a.steps_w4],
        "gptq-w3g64+kd": [*w3, "--recover", "kd", "--recover-steps", a.steps_w4],
    }
    measure_on_two_domains(model, [(r, specs[r]) for r in a.rows.split(",")], a.out)


if __name__ == "__main__":
    main()
