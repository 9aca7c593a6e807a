"""Helpers the benchmark scripts share (run them as `python benchmarks/NAME.py`, which puts this folder on the path)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text"


def example_model() -> str:
    """Path of the built-in SmolLM2 example model, built on first use."""
    return subprocess.run([sys.executable, "-m", "compress_export.cli", "example-model"],
                          capture_output=True, text=True, check=True).stdout.strip()
