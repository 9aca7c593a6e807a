#!/usr/bin/env bash
# Set up (.venv, all extras), lint (scripts/lint.sh), and run every test tier: the layer contracts, fast math/format tests, the tiny model through every
# pass, SmolLM2 end to end, and real vLLM (CPU backend) offline and served on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/lint.sh  # ruff and mypy first: a lint failure costs seconds, not the whole suite
python -m pytest -q -rs "$@"
