"""Optimum-style loading: `AutoCompressedModelForCausalLM.from_pretrained(OUT)` returns a transformers model whose
compressed linears stay packed and run the kernel registry's choice (the fast CPU kernel where it fits).

    from compress_export import AutoCompressedModelForCausalLM, CompressionConfig
    model = AutoCompressedModelForCausalLM.from_pretrained(OUT)                      # an export, any format
    model = AutoCompressedModelForCausalLM.from_pretrained(MODEL_DIR, export=True,   # compress on load
                quantization_config=CompressionConfig(method="gptq", bits=4, group_size=64, dataset="calib.txt"))
    model.save_pretrained(DIR)                                                       # the export, as written

It is transformers' own loader with our quantizer (integrations/transformers_quantizer.py) chosen for every
format, whatever backends are installed; `AutoModelForCausalLM.from_pretrained(OUT)` uses ours only where
transformers' own backend is missing. Export on load runs the same pipeline as the CLI into a folder (output_dir,
or a temporary one removed with the model), then loads from it. save_pretrained writes the format's tensors as
they were read (repacked from the kernel's layout, byte for byte) and copies the tokenizer files beside them, so
`compress-export eval DIR` and `vllm serve DIR` read the result.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

from compress_export.core.errors import UserError
from compress_export.io.lowrank import ADAPTER_DIR
from compress_export.io.safety import allowed_roots, check_entry, check_output, copy_file, copy_tree

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _device_of(device_map) -> str:
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        devs = {str(v) for v in device_map.values()}
        return next((d for d in devs if d.startswith("cuda") or d.isdigit()), "cpu")
    return "cpu" if str(device_map) in ("cpu", "auto") and not _has_cuda() else str(device_map)


def _has_cuda() -> bool:
    from compress_export.core.hardware import has_cuda

    return has_cuda()


def _export(model_dir, quantization_config, output_dir, progress, trust_remote_code) -> Path:
    from compress_export.pipeline.compress import compress
    from compress_export.pipeline.config import CompressionConfig

    cfg = quantization_config
    if cfg is None:
        cfg = CompressionConfig()
    elif isinstance(cfg, dict):
        cfg = CompressionConfig.from_dict(cfg, where="quantization_config")
    elif not isinstance(cfg, CompressionConfig):
        raise UserError(
            "export=True takes quantization_config=CompressionConfig(...) (or a dict of its fields), "
            f"not {type(cfg).__name__}"
        )
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="compress-export-")) / "export"
    compress(model_dir, out, cfg, overwrite=output_dir is None, progress=progress, trust_remote_code=trust_remote_code)
    return out


def _save_as_read(model, source: Path, original_save):
    """save_pretrained that writes the export as it was read (the quantizer's get_state_dict_and_metadata does the
    same for compressed models; this covers plain ones such as dense pruned exports) and copies its tokenizer
    files, so the saved folder is a whole export."""
    from compress_export.integrations.transformers_quantizer import safetensors_headers, state_dict_as_stored

    stored = {k: dt for k, (dt, _) in safetensors_headers(sorted(source.glob("*.safetensors"))).items()}

    def save_pretrained(save_directory, *args, **kwargs):
        # an output like -o: never the export it was read from (or inside it, or holding it), and an existing
        # folder only if compress-export wrote it
        check_output(save_directory, [source], overwrite=True, flag="save_pretrained")
        if getattr(model, "hf_quantizer", None) is None and "state_dict" not in kwargs:
            kwargs["state_dict"] = state_dict_as_stored(model, stored)
        result = original_save(save_directory, *args, **kwargs)
        roots = allowed_roots(source)
        for name in TOKENIZER_FILES:  # by content, regular files inside the export only
            if (source / name).exists() and not (Path(save_directory) / name).exists():
                check_entry(source / name, roots, source)
                copy_file(source / name, Path(save_directory) / name)
        adapter = source / ADAPTER_DIR  # the low-rank correction travels with the export
        if adapter.is_dir() and not (Path(save_directory) / ADAPTER_DIR).exists():
            copy_tree(adapter, Path(save_directory) / ADAPTER_DIR, roots)
        return result

    save_pretrained.__doc__ = original_save.__doc__
    return save_pretrained


class AutoCompressedModelForCausalLM:
    """Loads compress-export exports (gptq, awq, compressed-tensors, sparse24) as transformers models."""

    def __init__(self):
        raise TypeError("use AutoCompressedModelForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        model_dir,
        *,
        export: bool = False,
        quantization_config=None,
        dtype=None,
        device_map=None,
        output_dir=None,
        trust_remote_code: bool = False,
        progress: bool = True,
        **kwargs,
    ):
        """Load an export (or, with export=True, compress MODEL_DIR first). dtype: the activation dtype (default:
        this machine's fastest, bf16 on CPUs with AVX-512 bf16, else float32; bf16 on CUDA). An export's low-rank
        correction (OUT/lowrank) is applied (by our transformers quantizer, as the export describes the model with
        it; `load_model(OUT, lowrank=False)` gives the model without it)."""
        import torch
        from transformers import AutoModelForCausalLM

        from compress_export.core.hardware import fast_dtype
        from compress_export.integrations.transformers_quantizer import register, route_all_to_us
        from compress_export.io import model_io
        from compress_export.io.export_check import check_export

        src = model_io.check_model_dir(model_dir)
        temp = None
        if export:
            src = _export(src, quantization_config, output_dir, progress, trust_remote_code)
            temp = None if output_dir else src.parent
        elif quantization_config is not None:
            raise UserError("quantization_config is for export=True; an export already carries its own")
        # the tensors against config.json before transformers reads any; a model with its own code (allowed here)
        # is built by that code, which the check never runs: its packed linears are checked by their own layout
        cfg = check_export(src, quantized=False, lenient=trust_remote_code).config
        if not cfg.get("quantization_config") and "compress_export_sparsity" not in cfg:  # dense: a plain model
            raise UserError(
                f"{src} is not a compressed export (its config.json has no quantization_config); "
                "pass export=True with a quantization_config to compress it on load"
            )
        register()
        dtype = dtype or getattr(torch, fast_dtype(_device_of(device_map)))
        with route_all_to_us():
            model = AutoModelForCausalLM.from_pretrained(
                str(src), dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, **kwargs
            )
        model.save_pretrained = _save_as_read(model, src, model.save_pretrained)
        model.compress_export_dir = str(src)
        if temp is not None:  # the temporary export lives as long as the model
            weakref.finalize(model, shutil.rmtree, str(temp), True)
        return model
