#!/usr/bin/env bash
# The habits CI checks before the tests (scripts/test.sh runs this first; .pre-commit-config.yaml runs the same tools):
# ruff's lint and format, mypy on the lower layers (core, math, formats, kernels: mypy.ini), and the import-linter
# layer contracts (tests/test_architecture.py runs them too, on the package as the wheel lays it out).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VIRTUAL_ENV:-.venv}/bin
"$BIN/ruff" check .
"$BIN/ruff" format --check .
"$BIN/mypy" --config-file mypy.ini
echo "lint: ruff and mypy clean"
