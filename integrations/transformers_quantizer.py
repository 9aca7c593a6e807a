"""transformers integration: `AutoModelForCausalLM.from_pretrained(OUT)` for every format we write.

One quantizer (`CompressExportHfQuantizer`) loads gptq, awq, compressed-tensors and sparse24 exports: before the
weights load, each linear the checkpoint stores packed becomes a `PackedLinear` whose parameters have the
checkpoint's own shapes and dtypes (read from the safetensors headers, so transformers' loader fills them by name
and never casts them); after loading, each is unpacked by its format and replaced by a `QuantLinear` running the
kernel registry's choice (the fast CPU kernel where it fits), keeping the weights packed.

Which quantizer loads a checkpoint:
- `compress_export_sparse24` (only ours): registered with transformers' public `register_quantization_config` and
  `register_quantizer`.
- gptq, awq, compressed-tensors: transformers' own quantizer where its backend is installed (GPTQModel + optimum,
  AutoAWQ/GPTQModel, compressed-tensors), ours where it is missing. transformers' `register_quantizer` refuses a
  method it already knows, so the registry's own table (`AUTO_QUANTIZER_MAPPING`, which `AutoHfQuantizer` reads)
  gets, for these methods, a subclass of transformers' quantizer whose construction builds transformers' quantizer
  as before and hands over to ours only when its `validate_environment` fails for a missing package.
  COMPRESS_EXPORT_TRANSFORMERS=ours|theirs|auto chooses (default auto); `AutoCompressedModelForCausalLM` always
  takes ours. One log line says which route loaded the model.

`register()` does all of it, once. `compress_export.register_with_transformers()` calls it: `import compress_export`
does when transformers is already imported, and our own entry points that use transformers do before they use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path

import torch
import torch.nn as nn

from compress_export.core import settings

OUR_METHODS = ("compress_export_sparse24",)
TAKEOVER = ("gptq", "awq", "compressed-tensors")
log = logging.getLogger("compress_export")
_force_ours = contextvars.ContextVar("compress_export_force_ours", default=False)
_registered = False

_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "I64": torch.int64,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F64": torch.float64,
}


def safetensors_headers(files) -> dict:
    """{tensor name: (dtype, shape)} from the headers alone (no tensor data is read)."""
    from compress_export.io.model_io import safetensors_header

    out = {}
    for f in files or ():
        if str(f).endswith(".safetensors"):
            for name, info in safetensors_header(Path(f)).items():
                if name != "__metadata__":
                    out[name] = (_ST_DTYPES.get(info["dtype"]), tuple(info["shape"]))
    return out


class PackedLinear(nn.Module):
    """Placeholder holding one linear's packed tensors with the checkpoint's own shapes and dtypes."""

    def __init__(self, tensors: dict, in_f: int, out_f: int):
        super().__init__()
        self.in_features, self.out_features = in_f, out_f
        self.names = []
        for name, (dtype, shape) in tensors.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
            self.names.append(name)

    def forward(self, x):
        raise RuntimeError("PackedLinear runs only after loading has replaced it")


def _route() -> str:
    return settings.get("TRANSFORMERS", log)  # a bad value warns and counts as auto


@contextlib.contextmanager
def route_all_to_us():
    """Within this block every checkpoint format we read loads through our quantizer."""
    token = _force_ours.set(True)
    try:
        yield
    finally:
        _force_ours.reset(token)


def _takes_over(method: str, build_theirs):
    """(their quantizer or None, why ours loads instead or "") for a checkpoint of a format transformers knows."""
    mode = "ours" if _force_ours.get() else _route()
    if mode == "ours":
        return None, ("AutoCompressedModelForCausalLM" if _force_ours.get() else "COMPRESS_EXPORT_TRANSFORMERS=ours")
    try:
        theirs = build_theirs()
        if mode == "auto":
            theirs.validate_environment(device_map=None, weights_only=True)
    except ImportError as e:
        if mode == "theirs":
            raise
        return None, f"transformers' {method} backend is missing: {str(e).splitlines()[0]}"
    return theirs, ""


def raw_quantization_config(checkpoint_files) -> dict:
    """The quantization_config exactly as the checkpoint's config.json has it (transformers' own config classes
    drop the keys they do not know, such as the list of unquantized modules)."""
    from compress_export.io.export_check import check_export

    for f in checkpoint_files or ():
        if (Path(f).parent / "config.json").is_file():
            # the export as every verb checks it (headers, tensors against config.json), before transformers reads
            # a weight; lenient: the caller may have allowed an architecture only its own code builds
            qc = check_export(Path(f).parent, quantized=False, what="model", lenient=True).config.get(
                "quantization_config"
            )
            return qc if isinstance(qc, dict) else {}
    return {}


def state_dict_as_stored(model, stored: dict) -> dict:
    """The model's state dict as its checkpoint stored it: packed linears as their format's tensors (QuantLinear's
    state dict), every other tensor in its checkpoint dtype (bf16 embeddings upcast to float32 cast back exactly),
    tied weights under the name(s) the checkpoint used."""
    out, names_of = {}, {}
    sd = model.state_dict()
    for k, v in sd.items():
        names_of.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), []).append(k)
    for names in names_of.values():
        for k in [n for n in names if n in stored] or names:
            v = sd[k]
            out[k] = v.to(stored[k]) if k in stored and v.is_floating_point() else v
    return out


def _patterns(transform) -> list:
    p = getattr(transform, "source_patterns", ())
    return [p] if isinstance(p, str) else list(p)


def _merges_experts(pattern: str, model_type: str) -> bool:
    """A transformers conversion that reads every expert's tensor (`mlp.experts.*.gate_proj.weight`) to merge them
    into a fused parameter, or that renames the MoE block this model type's unfused model keeps under its
    checkpoint name (Mixtral's `.block_sparse_moe.` → `.mlp.`, core/moe.STORED_BLOCK): wrong for a model whose
    experts stayed per-expert linears."""
    from compress_export.core.moe import STORED_BLOCK

    stored = STORED_BLOCK.get(model_type, ("", ""))[1]
    return "experts.*." in pattern or bool(stored and stored in pattern)


def _make_classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class CompressExportHfConfig(QuantizationConfigMixin):
        """The checkpoint's quantization_config, kept as it was written (save_pretrained writes it back)."""

        def __init__(self, **kwargs):
            self._raw = dict(kwargs)
            self.quant_method = kwargs["quant_method"]
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self):
            return dict(self._raw)

    class CompressExportHfQuantizer(HfQuantizer):
        requires_calibration = True

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from compress_export.core.moe import unfuse_experts
            from compress_export.formats.base import format_for_config

            # MoE experts as the per-expert linears the export stores (core/moe.py); update_weight_conversions then
            # drops transformers' merge of those tensors into its fused 3-D parameters
            headers = safetensors_headers(checkpoint_files)
            self._unfused = unfuse_experts(model, headers) > 0
            self._model_type = getattr(model.config, "model_type", "")
            qcfg = raw_quantization_config(checkpoint_files) or self.quantization_config.to_dict()
            self.quantization_config = CompressExportHfConfig(**qcfg)  # saved back as it was read
            self._fmt, self._qcfg = format_for_config(qcfg), qcfg
            primary = self._fmt.primary_tensor(qcfg)
            from compress_export.io.lowrank import ADAPTER_DIR

            folders = {Path(f).parent / ADAPTER_DIR for f in checkpoint_files or ()}
            self._adapter = next((d for d in folders if d.is_dir()), None)
            self._stored = {k: dt for k, (dt, _) in headers.items()}
            packed = sorted({k[: -len(primary) - 1] for k in headers if k.endswith("." + primary)})
            for name in packed:
                try:
                    mod = model.get_submodule(name)
                except AttributeError:
                    continue  # transformers reports the checkpoint's unexpected keys itself
                if not isinstance(mod, nn.Linear):
                    continue
                tensors = {
                    k[len(name) + 1 :]: v
                    for k, v in headers.items()
                    if k.startswith(name + ".") and "." not in k[len(name) + 1 :]
                }
                parent, _, child = name.rpartition(".")
                setattr(
                    model.get_submodule(parent) if parent else model,
                    child,
                    PackedLinear(tensors, mod.in_features, mod.out_features),
                )

        def _process_model_after_weight_loading(self, model, **kwargs):
            from compress_export.io.loading import FormatTensors
            from compress_export.kernels.linear import QuantLinear

            dtype = next(
                (
                    p.dtype
                    for n, p in model.named_parameters()
                    if p.is_floating_point() and not isinstance(model.get_submodule(n.rpartition(".")[0]), PackedLinear)
                ),
                torch.float32,
            )
            for name, mod in list(model.named_modules()):
                if isinstance(mod, PackedLinear):
                    tensors = {n: getattr(mod, n).data for n in mod.names}
                    w = self._fmt.read(name, tensors, self._qcfg)
                    device = tensors[mod.names[0]].device
                    parent, _, child = name.rpartition(".")
                    setattr(
                        model.get_submodule(parent) if parent else model,
                        child,
                        QuantLinear(w, dtype, device.type, saved_as=FormatTensors(self._fmt, tensors)).to(device),
                    )
            if self._adapter is not None:  # the export's low-rank correction is part of the model it describes
                from compress_export.io.lowrank import apply_adapter

                apply_adapter(model, self._adapter)

        def update_weight_conversions(self, weight_conversions):
            if not getattr(self, "_unfused", False):
                return weight_conversions
            kind = getattr(self, "_model_type", "")
            return [t for t in weight_conversions if not any(_merges_experts(p, kind) for p in _patterns(t))]

        def get_state_dict_and_metadata(self, model):
            return state_dict_as_stored(model, getattr(self, "_stored", {})), {}

        def is_serializable(self, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    return CompressExportHfConfig, CompressExportHfQuantizer


def _routed(method: str, theirs_cls, config_cls, quantizer_cls):
    """What `AUTO_QUANTIZER_MAPPING[method]` holds for a method transformers knows: a subclass of its quantizer (so
    the table keeps a class of the kind it expects) whose construction returns transformers' quantizer or ours."""

    def __new__(cls, quantization_config, **kwargs):
        theirs, why = _takes_over(method, lambda: theirs_cls(quantization_config, **kwargs))
        if theirs is not None:
            log.info("compress-export: transformers' own %s quantizer loads this checkpoint", method)
            return theirs
        log.warning("compress-export: this %s checkpoint loads through compress-export's kernels (%s)", method, why)
        return quantizer_cls(config_cls(**quantization_config.to_dict()), **kwargs)

    return type(
        f"CompressExportRouted{theirs_cls.__name__}",
        (theirs_cls,),
        {"__new__": __new__, "compress_export_routes": theirs_cls, "__module__": __name__, "__doc__": _routed.__doc__},
    )


def _own(quantizer_cls):
    """Our quantizer under a method only we define, saying so once per load."""

    def __init__(self, quantization_config, **kwargs):
        quantizer_cls.__init__(self, quantization_config, **kwargs)
        log.warning(
            "compress-export: this %s checkpoint loads through compress-export's kernels (a format only "
            "compress-export defines)",
            quantization_config.quant_method,
        )

    return type("CompressExportOwnHfQuantizer", (quantizer_cls,), {"__init__": __init__, "__module__": __name__})


def register() -> None:
    """Idempotent: our config and quantizer under our own methods (transformers' `register_quantization_config` /
    `register_quantizer`), and the hand-over for the methods transformers also knows (its registry's table)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import auto as qauto

    config_cls, quantizer_cls = _make_classes()
    for method in OUR_METHODS:
        if method not in qauto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            qauto.register_quantization_config(method)(config_cls)
        if method not in qauto.AUTO_QUANTIZER_MAPPING:
            qauto.register_quantizer(method)(_own(quantizer_cls))
    for method in TAKEOVER:
        theirs = qauto.AUTO_QUANTIZER_MAPPING.get(method)
        if theirs is not None and not hasattr(theirs, "compress_export_routes"):
            qauto.AUTO_QUANTIZER_MAPPING[method] = _routed(method, theirs, config_cls, quantizer_cls)
    _registered = True
