"""Our own loader: an export (any registered format) or a plain directory → a torch causal LM.

Packed linears are unpacked by their format into the QuantizedWeight they came from, then either dequantized
into ordinary nn.Linear weights (`mode="dequant"`, exact reference) or run through the kernel registry
(`mode="kernel"`). W8A8 linears run their int8 kernel in both modes (activation quantization is part of them). Only safetensors are read; no remote code unless asked.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from compress_export.core.errors import UserError
from compress_export.core.moe import unfuse_experts
from compress_export.io import model_io
from compress_export.io.export_check import check_export
from compress_export.io.lowrank import ADAPTER_DIR, apply_adapter
from compress_export.kernels.linear import replace_linears


def read_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def read_quantized(path) -> tuple:
    """(config dict, {module name: QuantizedWeight}, {other tensor name: tensor}) of an export, checked first
    (export_check) and refusing NaN or Inf in any of its tensors."""
    return read_export(check_export(path))


def read_export(info) -> tuple:
    """read_quantized of an export export_check.check_export has passed."""
    p, cfg = info.path, info.config
    qcfg = cfg.get("quantization_config")
    if not qcfg:
        raise UserError(f"{p} has no quantization_config: it is not an export")
    fmt = info.fmt
    tensors = read_tensors(p)
    for k, t in tensors.items():  # every tensor is read anyway: a NaN scale or norm is named, not a NaN perplexity
        model_io.check_tensor_finite(t, k, p)
    first = fmt.primary_tensor(qcfg)
    modules = sorted(k[: -len(first) - 1] for k in tensors if k.endswith("." + first))
    groups = defaultdict(dict)
    for k in list(tensors):
        mod, _, suffix = k.rpartition(".")
        if mod in modules:
            groups[mod][suffix] = tensors.pop(k)
    return cfg, {m: fmt.read(m, groups[m], qcfg) for m in modules}, tensors


def load_model(path, dtype=torch.float32, mode: str = "dequant", trust_remote_code: bool = False, lowrank: bool = True):
    """Return (model, tokenizer). A plain (unquantized) directory loads as transformers would load it.
    lowrank: apply the export's low-rank correction (OUT/lowrank) when it has one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    info = check_export(path, quantized=False)  # the tensors against config.json before any is read
    p = info.path
    if not info.config.get("quantization_config"):  # refuses remote code not allowed and missing weights
        model, tok = model_io.load_source_model(p, dtype, trust_remote_code)
        model_io.check_finite(model, str(p))
        return model.eval(), tok
    tok = model_io.load_tokenizer(p, trust_remote_code)
    cfg, qweights, rest = read_export(info)
    rest = {k: v for k, v in rest.items() if k not in info.ignored}  # buffers transformers drops too (inv_freq)
    plain = dict(cfg)
    plain.pop("quantization_config")
    if "model_type" not in plain:
        raise UserError(f"{p}/config.json has no model_type")
    try:
        config = AutoConfig.for_model(
            **{k: v for k, v in plain.items() if k != "model_type"}, model_type=plain["model_type"]
        )
        # Built on the CPU (not meta) so non-persistent buffers such as rotary frequencies are real.
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
        unfuse_experts(model, model_io.tensor_index(p))  # experts as the export stores them (core/moe.py)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{p}/config.json does not describe a model transformers can build "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in rest.items()}
    for name, qw in qweights.items():
        state[name + ".weight"] = qw.dequantize(dtype)
        if qw.bias is not None:
            state[name + ".bias"] = qw.bias.to(dtype)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that disagree with config.json
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise UserError(f"{p}: checkpoint does not match config.json ({(lines or [str(e)])[0][:300]})") from None
    missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise UserError(
            f"{p}: checkpoint does not match the architecture (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    model.tie_weights()
    model = model.to(dtype).eval()
    # W8A8 linears always run their int8 kernel: quantizing activations per token is part of the model's function,
    # which a dequantized weight cannot express
    run = (
        qweights if mode == "kernel" else {n: q for n, q in qweights.items() if getattr(q.scheme, "act_bits", 16) == 8}
    )
    if run:
        replace_linears(model, run, dtype)
    adapter = p / ADAPTER_DIR
    if lowrank and adapter.is_dir():
        apply_adapter(model, adapter)
    return model, tok


class FormatTensors:
    """QuantLinear's `saved_as` for a linear read from a checkpoint: its state dict holds the tensors of the format
    `fmt` it was read from, so `save_pretrained` of a loaded model writes the export back unchanged while memory
    holds one packed copy. They are repacked from the kernel's own layout on save when the kernel gives its weight
    back exactly, else they are the tensors it was loaded from (`source`). The format knowledge lives here, not in
    the kernels. storage_dtype: what fmt.pack writes float values in, when no `source` is given for a weight it
    must keep."""

    def __init__(self, fmt, source: Optional[dict] = None, storage_dtype: torch.dtype = torch.float16):
        self.fmt, self.source, self.storage_dtype = fmt, source, storage_dtype
        self.kernel = None
        self.bias_src: Optional[torch.Tensor] = None

    def attach(self, qw, kernel, act_dtype) -> None:
        # The exact tensors are kept only where the kernel cannot give its weight back (pruning masks, float
        # values): a quantized weight with a mask would lose which kept weights sit at their zero point.
        exact = kernel.invertible and getattr(qw, "mask", None) is None
        self.kernel = kernel
        self.source = None if exact else dict(self.source or self.fmt.pack(qw, self.storage_dtype))
        self.bias_src = qw.bias if qw.bias is not None and qw.bias.dtype != act_dtype else None

    def tensors(self, bias) -> dict:
        """This linear in its checkpoint format's tensors, as they were read."""
        if self.source is not None:
            return self.source
        qw = self.kernel.quantized_weight()
        qw.bias = self.bias_src if self.bias_src is not None else bias
        return self.fmt.pack(qw, self.storage_dtype)

    def held(self) -> list:
        return list((self.source or {}).values())


def _is_tied(model, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)
