#!/usr/bin/env bash
# Rebuild the C extension in place (kernels/_cpu*.so) after editing kernels/csrc/. One build at a time (flock):
# several shells sharing a checkout would otherwise write the same .so at once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/compress-export-build.lock .venv/bin/python setup.py -q build_ext --inplace "$@"
