"""Our vLLM quantization method: runs any checkpoint format we read through our kernel registry.

It claims a checkpoint (via `override_quantization_method`) only where the installed vLLM has no kernel for
it: on CPU builds without the WNA16 op (the AVX2 wheel), for bit widths vLLM's own method lacks (2/3-bit or
asymmetric GPTQ on CUDA), or when asked by name (`--quantization compress_export`). Elsewhere it steps aside
and vLLM's own kernels (Marlin, Machete) run. Set COMPRESS_EXPORT_VLLM=always|never to force either way.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from compress_export.errors import UserError
from compress_export.formats import format_for_config
from compress_export.formats.base import ignored_modules
from compress_export.kernels import KernelRequest, choose_kernel

from .vllm_plugin import METHOD_NAME

# (quant_method, bits, sym) that stock vLLM runs on CUDA/ROCm with its own kernels.
_VLLM_CUDA_NATIVE = {("gptq", 4, True), ("gptq", 8, True), ("awq", 4, False),
                     ("compressed-tensors", 4, True), ("compressed-tensors", 8, True),
                     ("compressed-tensors", 4, False)}


def _cpu_has_wna16() -> bool:
    try:
        return hasattr(torch.ops._C, "cpu_gemm_wna16")
    except (AttributeError, RuntimeError):
        return False


def vllm_has_kernel(qcfg: dict) -> bool:
    from vllm.platforms import current_platform

    try:
        scheme = format_for_config(qcfg).scheme_from_config(qcfg)
    except (UserError, KeyError, ValueError):
        return True  # not ours to judge: leave it to vLLM
    if scheme is None or qcfg.get("quant_method") not in {k[0] for k in _VLLM_CUDA_NATIVE}:
        return False  # a format only we define (2:4 sparse): vLLM has no kernel anywhere
    # AWQ GEMM always carries zero points (symmetric weights are stored with zeros of 8): vLLM sees asymmetric.
    sym = scheme.symmetric and qcfg.get("quant_method") != "awq"
    key = (qcfg.get("quant_method"), scheme.bits, sym)
    if current_platform.is_cuda_alike():
        return key in _VLLM_CUDA_NATIVE
    if current_platform.is_cpu():
        # vLLM's CPU WNA16 path exists only in AVX-512 builds, and only for fp16/bf16 activations.
        return _cpu_has_wna16() and scheme.bits in (4, 8)
    return False


def _claims(qcfg: dict) -> bool:
    try:
        format_for_config(qcfg)
    except UserError:
        return False
    mode = os.environ.get("COMPRESS_EXPORT_VLLM", "auto")
    if mode == "never":
        return False
    return mode == "always" or not vllm_has_kernel(qcfg)


class CompressExportConfig(QuantizationConfig):
    def __init__(self, qcfg: dict):
        super().__init__()
        self.qcfg = qcfg
        self.fmt = format_for_config(qcfg)
        self.scheme = self.fmt.scheme_from_config(qcfg)
        # Each format names its unquantized modules its own way (GPTQ, AWQ, compressed-tensors `re:` patterns).
        names = ignored_modules(qcfg)
        self.not_quantized = {n for n in names if not n.startswith("re:")}
        self.not_quantized_re = [re.compile(n[3:]) for n in names if n.startswith("re:")]

    def __repr__(self):
        return f"CompressExportConfig({self.fmt.name}, {self.scheme})"

    @classmethod
    def get_name(cls):
        return METHOD_NAME

    @classmethod
    def get_supported_act_dtypes(cls):
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames():
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CompressExportConfig":
        return cls(config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[str]:
        if user_quant == METHOD_NAME:
            return METHOD_NAME
        if user_quant not in (None, hf_quant_cfg.get("quant_method")):
            return None
        return METHOD_NAME if _claims(hf_quant_cfg) else None

    def is_quantized(self, prefix: str) -> bool:
        if prefix in self.not_quantized or any(r.fullmatch(prefix) for r in self.not_quantized_re):
            return False
        if prefix.rpartition(".")[2] == "lm_head":
            return bool(self.qcfg.get("lm_head", False))
        return True

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if not self.is_quantized(prefix):
                return UnquantizedLinearMethod()
            return CompressExportLinearMethod(self)
        return None


def _make_param(spec, weight_loader):
    data = torch.zeros(spec.shape, dtype=spec.dtype)
    kw = dict(data=data, weight_loader=weight_loader)
    if spec.input_dim is not None and spec.output_dim is not None:
        if spec.packed_dim is not None:
            return PackedvLLMParameter(input_dim=spec.input_dim, output_dim=spec.output_dim,
                                       packed_dim=spec.packed_dim, packed_factor=spec.pack_factor, **kw)
        return GroupQuantScaleParameter(input_dim=spec.input_dim, output_dim=spec.output_dim, **kw)
    if spec.output_dim is not None:
        if spec.packed_dim is not None:
            return PackedColumnParameter(output_dim=spec.output_dim, packed_dim=spec.packed_dim,
                                         packed_factor=spec.pack_factor, **kw)
        return ChannelQuantScaleParameter(output_dim=spec.output_dim, **kw)
    if spec.input_dim is not None:
        return RowvLLMParameter(input_dim=spec.input_dim, **kw)
    return BasevLLMParameter(**kw)


class CompressExportLinearMethod(LinearMethodBase):
    """Allocates the format's tensors as vLLM parameters (so vLLM's loader fills and shards them), then
    unpacks them into a QuantizedWeight and hands that to the kernel the registry chooses."""

    def __init__(self, config: CompressExportConfig):
        self.config = config

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        scheme = self.config.scheme
        in_f, out_f = input_size_per_partition, sum(output_partition_sizes)
        if scheme is not None and scheme.group_size != -1 and in_f % scheme.group_size:
            raise ValueError(f"group size {scheme.group_size} does not divide this shard's input size {in_f}")
        loader = extra_weight_attrs.get("weight_loader")
        layout = self.config.fmt.tensor_layout(scheme, in_f, out_f)
        for name, spec in layout.items():
            layer.register_parameter(name, _make_param(spec, loader))
        if "g_idx" in layout:  # absent from some checkpoints: default to contiguous groups
            gs = in_f if scheme is None or scheme.group_size == -1 else scheme.group_size
            layer.g_idx.data.copy_(torch.arange(in_f, dtype=torch.int32) // gs)
        layer.ce_tensor_names = tuple(layout)
        layer.ce_act_dtype = params_dtype

    def process_weights_after_loading(self, layer) -> None:
        tensors = {n: getattr(layer, n).data for n in layer.ce_tensor_names}
        qw = self.config.fmt.unpack(tensors, self.config.qcfg)
        device = tensors[layer.ce_tensor_names[0]].device
        req = KernelRequest.for_weight(qw, layer.ce_act_dtype, device.type)
        kernel = choose_kernel(req)(qw, req)
        for n in layer.ce_tensor_names:  # the packed copies are no longer needed
            delattr(layer, n)
        for n, t in kernel.tensors().items():
            layer.register_buffer(f"ce_{n}", t, persistent=False)
        layer.ce_kernel = kernel

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = layer.ce_kernel(x)
        return y + bias if bias is not None else y
