#!/usr/bin/env bash
# The main job on the built-in example model: build SmolLM2-135M-Instruct, export GPTQ W4, measure, serve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=$(compress-export example-model)
OUT=out/SmolLM2-135M-Instruct-gptq-w4
# No --dataset: data-free calibration (the model writes its own text). 32 x 256 tokens keeps the demo to a few
# minutes on 2 cores; the benchmarks use 64 x 512 from a real text (see benchmarks/README.md).
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
