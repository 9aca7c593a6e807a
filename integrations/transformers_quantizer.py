"""transformers integration: `AutoModelForCausalLM.from_pretrained(OUT)` for the checkpoint formats only we define.

Registers a quantization config and an HfQuantizer for `compress_export_sparse24`. Before the weights load, each
compressed nn.Linear is replaced by a `PackedLinear` holding the format's tensors (shapes and dtypes from the
format's own TensorSpec layout), so transformers' loader fills them by name; after loading, each is unpacked by
the format and replaced by a `QuantLinear` running the kernel the registry chooses (2:4 semi-structured on CUDA
with fp16/bf16, dense elsewhere). GPTQ, AWQ and compressed-tensors keep transformers' own quantizers.

`import compress_export` arms a post-import hook, so this registers whenever transformers' quantizer registry is
imported, before or after compress_export, without importing transformers (or torch) eagerly.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

OUR_METHODS = ("compress_export_sparse24",)
_registered = False


class PackedLinear(nn.Module):
    """Placeholder with the packed tensors of one linear, filled by the checkpoint loader."""

    def __init__(self, fmt, scheme, in_f: int, out_f: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_f, out_f
        self.names = []
        for name, spec in fmt.tensor_layout(scheme, in_f, out_f).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(spec.shape, dtype=spec.dtype), requires_grad=False))
            self.names.append(name)
        self.bias = nn.Parameter(torch.zeros(out_f), requires_grad=False) if bias else None

    def forward(self, x):
        raise RuntimeError("PackedLinear runs only after loading has replaced it")


def register() -> None:
    """Idempotent: register our config and quantizer with transformers."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class CompressExportHfConfig(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self._raw = dict(kwargs)
            self.quant_method = kwargs["quant_method"]
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self):
            return dict(self._raw)

    class CompressExportHfQuantizer(HfQuantizer):
        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            from compress_export.formats import format_for_config

            qcfg = self.quantization_config.to_dict()
            fmt = format_for_config(qcfg)
            scheme = fmt.scheme_from_config(qcfg)
            ignore = [re.compile(n[3:] if n.startswith("re:") else re.escape(n)) for n in qcfg.get("ignore") or []]
            self._fmt, self._qcfg = fmt, qcfg
            for name, mod in list(model.named_modules()):
                if isinstance(mod, nn.Linear) and not any(r.fullmatch(name) for r in ignore):
                    parent, _, child = name.rpartition(".")
                    packed = PackedLinear(fmt, scheme, mod.in_features, mod.out_features, mod.bias is not None)
                    setattr(model.get_submodule(parent) if parent else model, child, packed)

        def _process_model_after_weight_loading(self, model, **kwargs):
            from compress_export.kernels.linear import QuantLinear

            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            for name, mod in list(model.named_modules()):
                if isinstance(mod, PackedLinear):
                    tensors = {n: getattr(mod, n).data for n in mod.names}
                    if mod.bias is not None:
                        tensors["bias"] = mod.bias.data
                    w = self._fmt.unpack(tensors, self._qcfg)
                    device = tensors[mod.names[0]].device
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child,
                            QuantLinear(w, dtype, device.type).to(device))

        def is_serializable(self, **kwargs):
            return False

        @property
        def is_trainable(self):
            return False

    for method in OUR_METHODS:
        AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(method, CompressExportHfConfig)
        AUTO_QUANTIZER_MAPPING.setdefault(method, CompressExportHfQuantizer)
    _registered = True
