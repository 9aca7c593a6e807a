"""AWQ's reference behaviours, measured: the clip search on every linear (this project's first AWQ) against
skipping it on the query and key projections (AutoAWQ, llm-compressor: `structure.AWQ_NO_CLIP`, the default);
and a scale scored on the balance linears' own output (from the Hessian) against the output of the whole
attention or MLP block, re-run on the recorded calibration inputs (AutoAWQ, llm-compressor: `--awq-score`).

  python benchmarks/awq_variants.py [--num-samples 64] [--seq-len 512] [--group-size 64] [--variants K ...]

SmolLM2 AWQ W4 asymmetric, calibrated on the first NUM_SAMPLES × SEQ_LEN tokens of calib.txt, written in the AWQ
format and scored by `compress-export eval` on eval.txt (the shared protocol). Both variants in one run; the
compression runs in this process (the variant is the AWQ pass's `no_clip` pattern), the evaluation in a fresh one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import TEXT, cli, example_model

from compress_export.core.scheme import Scheme
from compress_export.core.structure import AWQ_NO_CLIP
from compress_export.passes.awq_pass import AWQPass
from compress_export.pipeline.compress import compress

# name → (AWQPass.no_clip, the awq_score setting)
VARIANTS = {
    "clip every linear": (None, "linear"),
    "no clip on q/k (reference)": (AWQ_NO_CLIP, "linear"),
    "no clip on q/k, block-output scale score (reference)": (AWQ_NO_CLIP, "block"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument(
        "--variants",
        type=int,
        nargs="+",
        help="indices into the variants (default all): " + "; ".join(f"{i} {n}" for i, n in enumerate(VARIANTS)),
    )
    a = p.parse_args()
    chosen = [n for i, n in enumerate(VARIANTS) if a.variants is None or i in a.variants]
    model, rows = example_model(), []
    try:
        for name in chosen:
            AWQPass.no_clip, score = VARIANTS[name]
            with tempfile.TemporaryDirectory() as tmp:
                out, t = Path(tmp) / "awq", time.time()
                compress(
                    model,
                    out,
                    method="awq",
                    fmt="awq",
                    scheme=Scheme(4, a.group_size, False),
                    dataset=str(TEXT / "calib.txt"),
                    num_samples=a.num_samples,
                    seq_len=a.seq_len,
                    awq_score=score,
                    progress=False,
                )
                seconds = round(time.time() - t, 1)
                ev = cli("eval", out, "--text", TEXT / "eval.txt")
            rows.append(
                {
                    "variant": name,
                    "token_ppl": round(ev["token_perplexity"], 2),
                    "word_ppl": round(ev["word_perplexity"], 1),
                    "bits_per_byte": round(ev["bits_per_byte"], 4),
                    "seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        AWQPass.no_clip = AWQ_NO_CLIP
    print(f"\nSmolLM2 AWQ W4 g{a.group_size} asym, {a.num_samples}×{a.seq_len} calibration tokens, eval.txt\n")
    print("| variant | token ppl | word ppl | bits/byte | compress s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['token_ppl']} | {r['word_ppl']} | {r['bits_per_byte']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
