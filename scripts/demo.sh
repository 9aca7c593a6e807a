#!/usr/bin/env bash
# The main job on the built-in example model: build SmolLM2-135M-Instruct, export GPTQ W4, measure, serve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=$(compress-export example-model)
OUT=out/SmolLM2-135M-Instruct-gptq-w4
# No --dataset: the built-in calibration text shipped with the package (read in well under a second; the old
# data-free mode, --dataset self, spent most of a 17-minute demo generating text). 32 x 256 tokens keeps the demo
# short on 2 cores; the benchmarks use 64 x 512 from calib.txt (see benchmarks/README.md, benchmarks/calibration.py).
compress-export --format gptq --bits 4 --num-samples 32 --seq-len 256 "$MODEL" -o "$OUT" --overwrite
EVAL_TEXT=${EVAL_TEXT:-../shared/data/text/eval.txt}
if [ -f "$EVAL_TEXT" ]; then
  compress-export eval "$MODEL" --text "$EVAL_TEXT"
  compress-export eval "$OUT" --text "$EVAL_TEXT"
else
  echo "no $EVAL_TEXT here: skipping perplexity (set EVAL_TEXT to any UTF-8 text)"
fi
# vLLM against the 16-bit model: quality, latency, throughput (offline and served), memory; small N (--quick).
TEXT_ARGS=()
if [ -f "$EVAL_TEXT" ]; then TEXT_ARGS=(--text "$EVAL_TEXT"); fi
compress-export validate "$OUT" --baseline "$MODEL" --quick --overwrite "${TEXT_ARGS[@]}"
echo "serve it with: compress-export serve $OUT   (or: vllm serve $OUT where vLLM's own command works)"
