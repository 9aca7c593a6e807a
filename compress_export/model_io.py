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
        if not isinstance(json.loads(cfg.read_text()), dict):
            raise UserError(f"{cfg} is not a JSON object of model settings")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg} is not valid JSON ({e})") from None
    if not list(p.glob("*.safetensors")):
        pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(f"{p} holds only pickle weights ({', '.join(pickles[:3])}); pickles are never loaded: "
                            "convert them to safetensors first")
        raise UserError(f"{p} has no *.safetensors weights")
    check_safetensors(p)
    return p


SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(f: Path) -> dict:
    """A safetensors file's header, checked against the file itself without reading any tensor: a readable header,
    known dtypes, each tensor's byte range matching its shape, and the data all there (a truncated download or an
    interrupted copy fails here, naming the file and what is wrong)."""
    def bad(why):
        return UserError(f"{f}: {why}; the file is damaged or incomplete: write or download it again")

    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise bad(f"only {size} bytes, too short for a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > 100 << 20:
            raise bad(f"its header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            width = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = (int(v) for v in info["data_offsets"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name} has an unreadable entry {str(info)[:120]}") from None
        if end - start != numel * width or start < 0:
            raise bad(f"tensor {name}: shape {info['shape']} of {info['dtype']} needs {numel * width} bytes, "
                      f"its range holds {end - start}")
        if end > data:
            raise bad(f"tensor {name} ends at byte {end} of the data but the file holds only {data}")
    return header


def check_safetensors(p: Path) -> None:
    """Every safetensors file of a model directory, headers against sizes, and the shard index against the files."""
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a valid shard index ({e})") from None
        missing = sorted(f for f in files if not (p / f).exists())
        if missing:
            raise UserError(f"{index} lists {', '.join(missing[:3])}, missing from {p}; the download is incomplete")
    for f in sorted(p.glob("*.safetensors")):
        safetensors_header(f)


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def check_not_quantized(p: Path) -> None:
    qc = read_config(p).get("quantization_config")
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise UserError(f"{p} is already quantized ({method}); compress the unquantized model instead")


def tensor_index(p: Path) -> dict:
    """{tensor name: (the safetensors file holding it, dtype tag, shape)}, from the headers alone."""
    index = {}
    for f in sorted(Path(p).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if name != "__metadata__":
                index[name] = (f, info["dtype"], tuple(info["shape"]))
    return index


def load_source_model(path, dtype=torch.float32, trust_remote_code: bool = False):
    """Load an unquantized HF causal LM and its tokenizer for compression (fp32 compute on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    check_not_quantized(p)
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
        check_tensor_finite(t, name, where)


def check_tensor_finite(t: torch.Tensor, name: str, where) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise UserError(f"{where}: tensor {name} has NaN or Inf values; fix the checkpoint first")


def source_dtype(path) -> torch.dtype:
    cfg = read_config(path)
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)
