"""Reading a source model directory safely: safetensors only, no remote code unless asked, never written to."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_dir(path, what: str = "MODEL_DIR") -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {p} is not a directory (give a Hugging Face model directory)")
    cfg = p / "config.json"
    if not cfg.exists():
        raise UserError(f"{p} is not a model directory: it has no config.json")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg} is not valid JSON ({e})") from None
    if not list(p.glob("*.safetensors")):
        pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(f"{p} holds only pickle weights ({', '.join(pickles[:3])}); pickles are never loaded: "
                            "convert them to safetensors first")
        raise UserError(f"{p} has no *.safetensors weights")
    return p


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def load_source_model(path, dtype=torch.float32, trust_remote_code: bool = False):
    """Load an unquantized HF causal LM and its tokenizer for compression (fp32 compute on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    cfg = read_config(p)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method")
        raise UserError(f"{p} is already quantized ({method}); compress the unquantized model instead")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        raise UserError(f"{p}: transformers cannot load this model ({str(e).splitlines()[0]})") from None
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    return model, tok


def check_finite(model, where: str) -> None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{where}: tensor {name} has NaN or Inf values; fix the checkpoint first")


def source_dtype(path) -> torch.dtype:
    cfg = read_config(path)
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)
