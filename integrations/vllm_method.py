"""Our vLLM quantization method: runs any checkpoint format we read through our kernel registry.

Whether it claims a checkpoint (`override_quantization_method`) is `vllm_route.decide`: where the installed vLLM
has no kernel for it, judged by vLLM's own classes, and on the CPU wherever our compiled kernel runs it; or when
asked by name (`--quantization compress_export`). COMPRESS_EXPORT_VLLM=always|never forces either way. The
decision and its reason are logged once per checkpoint in vLLM's log.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch

from compress_export.core import settings
from compress_export.core.errors import UserError
from compress_export.formats.base import format_for_config, ignored_modules, replicated_groups, shard_replicates_groups
from compress_export.integrations import vllm_lowrank
from compress_export.integrations.vllm_api import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    LinearBase,
    LinearMethodBase,
    PackedColumnParameter,
    PackedvLLMParameter,
    QuantizationConfig,
    RowvLLMParameter,
    UnquantizedLinearMethod,
    VllmApiError,
)
from compress_export.integrations.vllm_api import get as vllm_name
from compress_export.integrations.vllm_route import METHOD_NAME, Route, decide, log
from compress_export.kernels.base import KernelRequest, choose_kernel


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
        self._lowrank = None  # the export's low-rank factors not yet fused, read at the first linear (vllm_lowrank)
        self.lowrank_checked = False

    def lowrank_factors(self) -> Optional[dict]:
        if not vllm_lowrank.fused_requested():
            return None
        if self._lowrank is None:
            # vLLM's LoRA layers could add the adapter again
            if vllm_name("get_current_vllm_config")().lora_config is not None:
                raise ValueError(
                    f"{vllm_lowrank.ENV}=fused applies the export's correction inside our plugin's "
                    f"linears; run without --enable-lora, or unset {vllm_lowrank.ENV}"
                )
            self._lowrank = vllm_lowrank.read_factors()
        return self._lowrank

    def check_lowrank_used(self) -> None:
        """At the first forward, every layer has taken its pair: any left would silently not be applied."""
        self.lowrank_checked = True
        if self._lowrank:
            left = sorted(self._lowrank)
            raise ValueError(
                f"{vllm_lowrank.ENV}=fused: {len(left)} linears of the correction match no linear our "
                f"plugin runs (first: {left[0]}); unset {vllm_lowrank.ENV} to serve it as a LoRA"
            )

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
    def from_config(cls, config: dict[str, Any]) -> CompressExportConfig:
        return cls(config)

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Keep every tensor: vLLM's default mapper drops `.g_idx` (act-order), which our kernels read."""
        return vllm_name("WeightsMapper")()

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[str]:
        check_export_folder(hf_quant_cfg, hf_config)
        route = decide(hf_quant_cfg, user_quant, hf_config)
        if not route.claim and vllm_lowrank.fused_requested():  # only our linears apply a fused correction
            route = _fused_claim(hf_quant_cfg, user_quant, route)
        log.info(
            "compress-export plugin %s this checkpoint: %s", "claims" if route.claim else "leaves vLLM", route.reason
        )
        return METHOD_NAME if route.claim else None

    def layer_config(self, prefix: str) -> Optional[dict]:
        """The quantization_config of the layer vLLM builds under `prefix` (per-module overrides applied; None:
        left unquantized). A fused layer (qkv_proj) takes its parts' (q_proj, k_proj, v_proj), which must agree."""
        parent, _, leaf = prefix.rpartition(".")
        parts = getattr(self, "packed_modules_mapping", {}).get(leaf) or []
        names = [f"{parent}.{p}" if parent else p for p in parts] or [prefix]
        found = [self.fmt.module_config(self.qcfg, n) for n in names]
        if any(f != found[0] for f in found):
            raise ValueError(
                f"{prefix}: the checkpoint gives its parts {', '.join(parts)} different schemes, and vLLM runs them "
                "as one layer"
            )
        return found[0]

    def is_quantized(self, prefix: str) -> bool:
        if prefix in self.not_quantized or any(r.fullmatch(prefix) for r in self.not_quantized_re):
            return False
        if self.layer_config(prefix) is None:  # a "-:" override
            return False
        if prefix.rpartition(".")[2] == "lm_head":
            return bool(self.qcfg.get("lm_head", False))
        return True

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if not self.is_quantized(prefix):
                return UnquantizedLinearMethod()
            return CompressExportLinearMethod(self, prefix)
        if _is_moe_layer(layer) and self.is_quantized(prefix):
            from compress_export.integrations.vllm_moe import make_moe_method

            return make_moe_method(self, layer.moe_config, prefix)
        return None


def _is_moe_layer(layer) -> bool:
    """vLLM's MoE layer class (a vLLM without it has no MoE layer to ask about: a dense model still loads)."""
    try:
        return isinstance(layer, vllm_name("RoutedExperts"))
    except VllmApiError:
        return False


_checked_folders: set = set()  # export folders this process has validated (vLLM may ask more than once)


def check_export_folder(hf_quant_cfg, hf_config) -> None:
    """Validate the export once per folder (export_check), so a broken one stops at load with one line naming
    the tensor instead of failing deep inside vLLM's weight loading. This is where our plugin first learns the
    folder: vLLM asks each method whether it overrides the checkpoint's, passing the model's transformers config,
    whose name_or_path is the folder vLLM was given. Only exports compress-export wrote are checked
    (export_check.check_served_export): hub ids and foreign checkpoints, even in formats we read, are vLLM's to
    judge, so installing our plugin never makes vLLM refuse a model it served before."""
    folder = getattr(hf_config, "name_or_path", None) or ""
    if not folder or not os.path.isdir(folder):
        return
    key = os.path.realpath(folder)
    if key in _checked_folders:
        return
    from compress_export.io.export_check import check_served_export

    check_served_export(key)
    _checked_folders.add(key)


def _fused_claim(hf_quant_cfg, user_quant, route) -> Route:
    """Claim a checkpoint vLLM would run itself, because the correction is fused into our linears; refuse where
    the user asked for another method or our plugin cannot read the format."""
    env = vllm_lowrank.ENV
    if settings.get("VLLM", log) == "never":
        raise UserError(f"{env}=fused needs our plugin to run the linears, but COMPRESS_EXPORT_VLLM=never; unset one")
    if user_quant and user_quant != METHOD_NAME:
        raise UserError(
            f"{env}=fused needs our plugin (--quantization {METHOD_NAME}), not --quantization "
            f"{user_quant}; unset {env} to serve the correction as a LoRA"
        )
    try:
        format_for_config(hf_quant_cfg)
    except Exception:
        raise UserError(
            f"{env}=fused, but compress-export does not read this checkpoint's format ({route.reason}); unset {env}"
        ) from None
    return Route(True, f"{env}=fused (our linears apply the low-rank correction)")


def _make_param(spec, weight_loader):
    data = torch.zeros(spec.shape, dtype=spec.dtype)
    kw = dict(data=data, weight_loader=weight_loader)
    if spec.input_dim is not None and spec.output_dim is not None:
        if spec.packed_dim is not None:
            return PackedvLLMParameter(
                input_dim=spec.input_dim,
                output_dim=spec.output_dim,
                packed_dim=spec.packed_dim,
                packed_factor=spec.pack_factor,
                **kw,
            )
        return GroupQuantScaleParameter(input_dim=spec.input_dim, output_dim=spec.output_dim, **kw)
    if spec.output_dim is not None:
        if spec.packed_dim is not None:
            return PackedColumnParameter(
                output_dim=spec.output_dim, packed_dim=spec.packed_dim, packed_factor=spec.pack_factor, **kw
            )
        return ChannelQuantScaleParameter(output_dim=spec.output_dim, **kw)
    if spec.input_dim is not None:
        return RowvLLMParameter(input_dim=spec.input_dim, **kw)
    return BasevLLMParameter(**kw)


class CompressExportLinearMethod(LinearMethodBase):
    """Allocates the format's tensors as vLLM parameters (so vLLM's loader fills and shards them), then
    unpacks them into a QuantizedWeight and hands that to the kernel the registry chooses."""

    def __init__(self, config: CompressExportConfig, prefix: str = ""):
        self.config, self.prefix = config, prefix
        # this layer's own config and scheme: the checkpoint's, or its per-module override (mixed precision)
        self.qcfg = config.layer_config(prefix) or config.qcfg
        self.scheme = config.scheme if self.qcfg is config.qcfg else config.fmt.scheme_from_config(self.qcfg)

    def create_weights(
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        **extra_weight_attrs,
    ):
        scheme = self.scheme
        in_f, out_f = input_size_per_partition, sum(output_partition_sizes)
        if scheme is not None and not scheme.divides(in_f):
            raise ValueError(f"group size {scheme.group_size} does not divide this shard's input size {in_f}")
        loader = extra_weight_attrs.get("weight_loader")
        layout = self.config.fmt.tensor_layout(scheme, in_f, out_f, self.config.fmt.stored_dtype(self.qcfg))
        # Row-parallel shards of per-channel and act-order linears keep every group (vLLM's auto_gptq does the
        # same): one group cannot be narrowed, and an act-order shard's g_idx points at groups across the input.
        groups = shard_replicates_groups(scheme, input_size, in_f)
        if groups is not None:
            layout = replicated_groups(layout, groups)
        layer.ce_groups = groups
        # A row shard of contiguous groups holds groups [rank·G/tp, ...): the checkpoint's g_idx counts from the
        # whole linear's first group, so it is rebuilt locally after loading (act-order shards keep theirs).
        layer.ce_local_groups = input_size != in_f and groups is None and scheme is not None
        for name, spec in layout.items():
            layer.register_parameter(name, _make_param(spec, loader))
        for name in (n for n in layout if n.endswith("g_idx")):
            if scheme is not None and scheme.act_order == "group":  # must come from the checkpoint: -1 until then
                getattr(layer, name).data.fill_(-1)
            else:  # absent from some checkpoints: contiguous groups
                gs = in_f if scheme is None else scheme.group_len(in_f)
                getattr(layer, name).data.copy_(torch.arange(in_f, dtype=torch.int32) // gs)
        layer.ce_tensor_names = tuple(layout)
        layer.ce_act_dtype = params_dtype
        layer.ce_shape = (out_f, in_f)
        layer.ce_parts = list(output_partition_sizes)

    def process_weights_after_loading(self, layer) -> None:
        tensors = {n: getattr(layer, n).data for n in layer.ce_tensor_names}
        missing = [n for n, t in tensors.items() if n.endswith("g_idx") and bool((t < 0).any())]
        if missing:
            raise ValueError(
                f"{getattr(layer, 'prefix', 'a linear')}: {missing[0]} (act-order) was not loaded from "
                "the checkpoint; it is needed to run this layer correctly"
            )
        if layer.ce_local_groups:
            gs = self.scheme.group_len(layer.ce_shape[1])
            for n in (n for n in tensors if n.endswith("g_idx")):
                tensors[n] = torch.arange(layer.ce_shape[1], dtype=tensors[n].dtype) // gs
        if "weight_shape" in tensors:
            # compressed-tensors records each linear's shape; vLLM loads every shard of a fused linear (q, k, v)
            # into this one small tensor, so the last shard's shape is left. The partition's is the true one.
            tensors["weight_shape"] = torch.tensor(layer.ce_shape, dtype=tensors["weight_shape"].dtype)
        qw = self.config.fmt.read(getattr(layer, "prefix", "a linear"), tensors, self.qcfg, groups=layer.ce_groups)
        device = tensors[layer.ce_tensor_names[0]].device
        req = KernelRequest.for_weight(qw, layer.ce_act_dtype, device.type)
        kernel = choose_kernel(req)(qw, req)
        for n in layer.ce_tensor_names:  # the packed copies are no longer needed
            delattr(layer, n)
        for n, t in kernel.tensors().items():
            layer.register_buffer(f"ce_{n}", t, persistent=False)
        # vLLM's LoRA layers find a quantized base layer's device through its packed weight's name (weight_packed,
        # qweight): alias the kernel's first tensor there, so LoRA adapters (low-rank corrections) can wrap it
        first = next(iter(kernel.tensors().values()), None)
        if first is not None:
            layer.register_buffer("weight_packed", first, persistent=False)
        layer.ce_kernel = kernel
        layer.ce_kernel_name = kernel.name
        self._fuse_lowrank(layer, device)

    def _fuse_lowrank(self, layer, device) -> None:
        """Keep this linear's low-rank pair (vllm_lowrank) beside its kernel when the correction is fused."""
        factors = self.config.lowrank_factors()
        if factors is None:
            return
        if getattr(layer, "tp_size", 1) > 1:
            raise ValueError(
                f"{vllm_lowrank.ENV}=fused needs tensor-parallel size 1 ({self.prefix} is sharded "
                f"{layer.tp_size} ways); serve the correction as a LoRA instead"
            )
        leaf = self.prefix.rpartition(".")[2]
        parts = getattr(self.config, "packed_modules_mapping", {}).get(leaf, [])
        lr = vllm_lowrank.fused_factors(factors, self.prefix, parts, layer.ce_parts, layer.ce_shape[1])
        if lr is not None:  # kernels/lowrank.py's layout; the buffers only make the tensors the module's own
            lr = lr.to(device)
            for n, t in lr.tensors().items():
                layer.register_buffer(f"ce_lowrank_{n}", t, persistent=False)
            layer.ce_lowrank = lr

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.config.lowrank_checked:
            self.config.check_lowrank_used()
        y = layer.ce_kernel(x)
        lr = getattr(layer, "ce_lowrank", None)
        if lr is not None:  # the fused low-rank correction, y += B·(A·x), in place on the kernel's fresh output
            y = lr.add_to(x, y)
        return y + bias if bias is not None else y
