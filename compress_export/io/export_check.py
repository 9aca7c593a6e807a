"""One validator for every verb that reads an export: config.json and the safetensors headers against each other.

Exports come from strangers, so each verb (eval, convert, check, serve, validate, from_pretrained, our vLLM plugin)
first checks, without reading any tensor's data (well under a second even for a 70B export):
  1. the folder (model_io.check_model_dir: config.json, every safetensors header against its file);
  2. a quantization_config that a registered format claims, or the dense format's `compress_export_sparsity`;
  3. the tensor set against the architecture config.json describes, built on the meta device: every nn.Linear
     either packed (all of its format's tensors, with exactly the shapes its layout gives and no others) or
     plain (`weight` [out, in], `bias`), every other parameter and persistent buffer with its shape, nothing
     extra but buffers transformers drops on load (`rotary_emb.inv_freq`). Names that differ both ways within
     the same decoder layers (unfused MoE experts transformers fuses on load) get those layers' packed linears
     checked against their own layouts instead. compressed-tensors' two-number `weight_shape` records are the
     only data read (16 bytes each);
  4. the low-rank adapter OUT/lowrank when there is one: no pickle, its config, headers and factor shapes.
Every problem found ends as ONE UserError naming the folder, the first few tensors or fields, and what to do.
An unquantized model folder (quantized=False) is checked as a folder only: transformers renames legacy tensor
names when it loads one, so its names are not ours to judge.

Also here: the checks of eval's other inputs (the text and its windows, a non-finite perplexity), which cli.py's
cmd_eval runs for both engines.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from compress_export.core.errors import UserError
from compress_export.core.moe import unfuse_experts
from compress_export.io import model_io, safety
from compress_export.io.model_io import _st_clean as _clean
from compress_export.io.source import FLOAT_TAGS

SHOWN = 3  # problems quoted in the one-line message
# buffers old checkpoints still carry that transformers and vLLM drop on load (non-persistent since long ago)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INT_TAGS = {"int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL"}
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
)


@dataclass(frozen=True)
class ExportInfo:
    """What the check established. fmt None: an unquantized model folder (only with quantized=False)."""

    path: Path
    config: dict
    fmt: object = None
    scheme: object = None
    index: dict = field(default_factory=dict)  # {tensor: (file, dtype tag, shape)} (model_io.tensor_index)
    packed: dict = field(default_factory=dict)  # {module: (in_features, out_features)} of every packed linear
    ignored: tuple = ()  # stored names transformers drops on load (an old rotary_emb.inv_freq): readers skip them


def check_export(path, *, quantized: bool = True, what: str = "DIR", lenient: bool = False) -> ExportInfo:
    """Check an export from config.json and the headers; raise one UserError for everything found wrong.
    quantized=False: an unquantized model folder passes too (eval and serve take both).
    lenient (verbs that build no model: convert, check, serve, our vLLM plugin): an architecture transformers
    cannot build (vLLM may know it), or one it builds as another class than config.json names, gets each packed
    linear's own layout checked instead of a refusal."""
    p = model_io.check_model_dir(path, what)
    cfg = model_io.read_config(p)
    fmt, scheme, qcfg = _format(p, cfg, quantized)
    if fmt is None:
        return ExportInfo(p, cfg)
    check = _Check(p, fmt, scheme, qcfg)
    skeleton = _skeleton(p, cfg, check.index, lenient)
    packed = check.layout_only() if skeleton is None else check.against(skeleton)
    if check.problems:
        raise UserError(_refusal(p, cfg, check.problems))
    from compress_export.io.lowrank import ADAPTER_DIR

    if (p / ADAPTER_DIR).is_dir():  # read by eval, serve and from_pretrained: as much a stranger's file as the rest
        _check_adapter(p / ADAPTER_DIR, _linears(skeleton, packed, check.index))
    return ExportInfo(p, cfg, fmt, scheme, check.index, packed, tuple(sorted(check.ignored)))


def check_served_export(folder) -> bool:
    """Our vLLM plugin's check of the folder vLLM was given: only an export compress-export wrote is ours to
    judge (foreign GPTQ/AWQ/compressed-tensors checkpoints run on vLLM's own kernels, and installing our plugin
    must not make vLLM refuse them), and one that is ours is checked in full. Returns whether it was checked."""
    if not safety.is_our_output(Path(folder)):
        return False
    # lenient: vLLM serves architectures transformers cannot build (an export made with --trust-remote-code)
    check_export(folder, what="model", lenient=True)
    return True


def _format(p: Path, cfg: dict, quantized: bool):
    """(format, scheme, quantization_config) of the export; (None, None, None) for an unquantized folder."""
    from compress_export.formats.base import FORMATS, format_for_config, scheme_from_config

    qcfg = cfg.get("quantization_config")
    if qcfg:  # the same test as load_model's: an empty one is an unquantized model
        try:
            return format_for_config(qcfg), scheme_from_config(qcfg), qcfg
        except UserError as e:
            raise UserError(f"{p}/config.json: {e} (formats read: {', '.join(FORMATS.names())})") from None
    if "compress_export_sparsity" in cfg:  # the dense format: pruned weights stored plain
        return FORMATS.get("dense")(), None, {}
    if quantized:
        raise UserError(
            f"{p} has no quantization_config: it is not an export (give the folder compress-export "
            "wrote, or compress this model first)"
        )
    return None, None, None


def _skeleton(p: Path, cfg: dict, index: dict, lenient: bool):
    """The model config.json describes, every tensor on the meta device (nothing allocated, whatever its sizes);
    never remote code. None (lenient only) when transformers cannot build it as config.json names it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "model_type")}
    layers = cfg.get("num_hidden_layers")
    # every layer holds tensors: more layers than tensors is a wrong config, and would only make building slow
    if isinstance(layers, int) and layers > len(index):
        raise UserError(
            f"{p}/config.json: num_hidden_layers {layers} is more than the {len(index)} tensors the "
            "export holds; fix config.json, or write or download the export again"
        )
    try:
        if not cfg.get("model_type"):
            raise ValueError("config.json has no model_type")
        config = AutoConfig.for_model(cfg["model_type"], **plain)
        with init_empty_weights(include_buffers=True):  # buffers too: hostile sizes must not allocate
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()  # as from_pretrained does: a tied head is the embedding, stored once
        unfuse_experts(model, index)  # MoE experts as the export stores them (core/moe.py)
    except Exception as e:  # noqa: BLE001  (a hostile config.json can make transformers raise anything)
        if lenient:
            return None
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(
            f"{p}/config.json does not describe a model transformers can build ({type(e).__name__}: "
            f"{why}); fix config.json, or write or download the export again"
        ) from None
    archs = cfg.get("architectures") or []
    if lenient and archs and type(model).__name__ not in archs:
        return None  # e.g. a multimodal checkpoint vLLM serves: its tensor names are not this class's
    return model


class _Check:
    """The tensors of one export (from its headers) and the problems found with them."""

    def __init__(self, p: Path, fmt, scheme, qcfg: dict):
        self.p, self.fmt, self.scheme, self.qcfg = p, fmt, scheme, qcfg
        self.problems: list = []
        # check_model_dir has checked every header and refused a tensor stored twice
        self.index = model_io.tensor_index(p)  # {name: (file, tag, shape)}
        self.headers: dict = {}  # {file: its header}, read only where a weight_shape's numbers are needed
        self.ignored: set = set()  # stored names transformers drops on load
        self.by_module = defaultdict(dict)  # {module: {suffix: (file, tag, shape)}}
        for name, entry in self.index.items():
            mod, _, suffix = name.rpartition(".")
            self.by_module[mod][suffix] = entry

    def scheme_for(self, name: str):
        """The scheme of module `name`, per-module overrides applied (Format.module_scheme)."""
        return self.fmt.module_scheme(self.qcfg, name, self.scheme)

    def against(self, model) -> dict:
        """The tensors against the skeleton's linears, parameters and persistent buffers; returns the packed
        linears {name: (in, out)}. Names that differ both ways within the same layers are a checkpoint whose names
        transformers converts on load (unfused MoE experts): those layers' packed linears get their own layouts
        checked (layout_only) instead of a refusal, as source.check_tensors does for sources."""
        import torch.nn as nn

        fmt, problems = self.fmt, self.problems
        primary = fmt.primary_tensor(self.qcfg) if fmt.primary else None  # the dense format packs nothing
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        packed = {
            n: (m.in_features, m.out_features) for n, m in linears.items() if primary and self.is_packed(n, m, primary)
        }
        claimed = {f"{m}.{s}" for m in packed for s in self.by_module[m]}
        self.ignored = {n for n in self.index if _ignored(n, model)}  # buffers transformers drops on load
        claimed |= self.ignored
        seen, done, tied = set(), set(), bool(getattr(model.config, "tie_word_embeddings", False))
        missing = []
        for name, t in model.state_dict(keep_vars=True).items():  # in model order: the first problems first
            mod = name.rpartition(".")[0]
            if mod in packed:
                if mod not in done:
                    done.add(mod)
                    self.packed_linear(mod, *packed[mod], linears[mod].bias is not None)
                continue
            alias = id(t) in seen or (tied and name.endswith("lm_head.weight"))  # a tied head may be left out
            seen.add(id(t))
            if name not in self.index:
                if not alias:
                    missing.append(name)
                    problems.append(f"{name} is missing")
                continue
            claimed.add(name)
            _, tag, shape = self.index[name]
            if shape != tuple(t.shape):
                problems.append(f"{name} has shape {list(shape)}; config.json's model needs {list(t.shape)}")
            elif (tag in FLOAT_TAGS) != t.is_floating_point():
                problems.append(f"{name} is {tag}; the model holds it as {_dtype_name(t.dtype)}")
        extra = sorted(set(self.index) - claimed)
        converted = _converted(missing, extra)
        if converted:  # those layers' names are not this class's: neither missing nor extra there
            gone = {f"{n} is missing" for n in missing if _layer(n) in converted}
            problems[:] = [x for x in problems if x not in gone]
            packed = {**packed, **self.layout_only(skip=set(packed), layers=converted)}
            # what is left there must be plain (a router's weight); a packed linear's tensors without its primary
            # one are a linear that lost it
            lost = sorted(
                {
                    n.rpartition(".")[0]
                    for n in extra
                    if _layer(n) in converted
                    and primary
                    and n.rpartition(".")[0] not in packed
                    and n.rpartition(".")[2] not in ("weight", "bias")
                }
            )
            problems += [f"{m}.{primary} is missing ({fmt.name} stores it for every packed linear)" for m in lost]
            extra = [n for n in extra if _layer(n) not in converted]
        problems += [f"{_clean(n)} is not a tensor of this {model.config.model_type} model" for n in extra]
        return packed

    def is_packed(self, name: str, mod, primary: str) -> bool:
        """Its primary tensor is stored, or (a packed linear that lost it) another tensor only its format's
        layout has, so the missing primary tensor is what gets named."""
        have = self.by_module.get(name, {})
        if primary in have:
            return True
        try:
            layout = self.fmt.tensor_layout(self.scheme_for(name), mod.in_features, mod.out_features)
        except (ValueError, TypeError, ZeroDivisionError, KeyError):
            return False
        # `bias`, and a float `weight`, are what a plain linear stores too (W8A8's packed `weight` is int8)
        return any(
            k in layout and k != "bias" and (k != "weight" or tag not in FLOAT_TAGS) for k, (_, tag, _) in have.items()
        )

    def packed_linear(self, name: str, in_f: int, out_f: int, has_bias: bool) -> None:
        """One packed linear's tensors against the layout its format gives an out_f×in_f linear."""
        fmt, have, problems = self.fmt, self.by_module[name], self.problems
        if fmt.module_config(self.qcfg, name) is None:
            problems.append(f"{name} is stored packed, but quantization_config leaves it unquantized")
            return
        scheme = self.scheme_for(name)
        try:
            layout = fmt.tensor_layout(scheme, in_f, out_f)
        except (ValueError, TypeError, ZeroDivisionError, KeyError) as e:
            problems.append(f"quantization_config gives no layout for {name} ({type(e).__name__}: {e})")
            return
        act_order = getattr(scheme, "act_order", "none") == "group"
        for k, spec in layout.items():
            if k not in have:
                # an act-order g_idx cannot be left out: the default one would regroup the columns wrongly
                if k not in fmt.optional or (act_order and k.endswith("g_idx")):
                    problems.append(f"{name}.{k} is missing ({fmt.name} stores it for every packed linear)")
                continue
            _, tag, shape = have[k]
            if shape != tuple(spec.shape):
                problems.append(
                    f"{name}.{k} has shape {list(shape)}; a {out_f}×{in_f} linear in this {fmt.name} "
                    f"export needs {list(spec.shape)}"
                )
            elif not _dtype_fits(tag, spec.dtype):
                problems.append(f"{name}.{k} is {tag}; {fmt.name} stores it as {_dtype_name(spec.dtype)}")
            elif k == "weight_shape" and (said := self.ints(f"{name}.{k}")) != [out_f, in_f]:
                problems.append(f"{name}.weight_shape says {said}; the linear is [{out_f}, {in_f}]")
        problems += [
            f"{name}.{_clean(k)} is not a tensor of a packed {fmt.name} linear"
            for k in sorted(set(have) - set(layout) - {"bias"})
        ]
        if "bias" in have and (not has_bias or have["bias"][2] != (out_f,)):
            problems.append(
                f"{name}.bias has shape {list(have['bias'][2])}; the linear has "
                + (f"{out_f} outputs" if has_bias else "no bias")
            )
        elif has_bias and "bias" not in have:
            problems.append(f"{name}.bias is missing")

    def layout_only(self, skip=frozenset(), layers=None) -> dict:
        """Lenient: each packed linear (but those in `skip`, checked already; only those in `layers` when given)
        against the layout its own primary tensor implies (its shape read by packed_linears, as tp_plan reads it), where no skeleton
        says what the model holds."""
        if not self.fmt.primary:
            return {}
        try:
            packed = packed_linears(self.p, self.fmt, self.scheme, self.qcfg, self.index, self.headers)
        except Exception as e:  # noqa: BLE001  (impossible shapes in a hostile header)
            self.problems.append(f"a packed linear has an impossible shape ({type(e).__name__}: {e})")
            return {}
        packed = {n: s for n, s in packed.items() if n not in skip and (layers is None or _layer(n) in layers)}
        for name, (in_f, out_f) in packed.items():
            self.packed_linear(name, in_f, out_f, "bias" in self.by_module[name])
        return packed

    def ints(self, name: str) -> list:
        return stored_ints(self.index[name][0], name, self.headers)


def stored_ints(f: Path, name: str, headers: dict) -> list:
    """The int64 values of a tiny tensor (compressed-tensors' weight_shape), read as bytes at the offsets its
    checked header gives: the only data the checks read (16 bytes a linear). `headers` caches {file: header}.
    The data region ends the file (model_io checked that the ranges tile it), so it starts at the file's size
    less the last tensor's end: no second parse of the header's length."""
    header = headers.get(f)
    if header is None:
        header = headers[f] = model_io.safetensors_header(f)
    info = header[name]
    if info["dtype"] != "I64":  # raw bytes of another dtype would read as nonsense numbers
        raise UserError(f"{_clean(f, 200)}: tensor {_clean(name)} is {info['dtype']}; it records int64 numbers")
    start, end = info["data_offsets"]
    last = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    with safety.open_regular(Path(f).resolve()) as fh:
        fh.seek(fh.seek(0, os.SEEK_END) - last + start)
        raw = fh.read(end - start)
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, len(raw), 8)]


def _ignored(name: str, model) -> bool:
    """A stored name transformers drops on load: an old non-persistent buffer, or one the model class's
    _keys_to_ignore_on_load_unexpected patterns match (transformers applies them with re.search)."""
    if name.endswith(IGNORED_SUFFIXES):
        return True
    return any(re.search(pat, name) for pat in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()))


def _layer(name: str):
    """The decoder layer a tensor name belongs to ("model.layers.3" of "model.layers.3.mlp.experts.0.w1.qweight"),
    or None for a tensor outside the layers."""
    parts = name.split(".")
    i = next((i for i, x in enumerate(parts) if x.isdigit()), None)
    return None if i is None else ".".join(parts[: i + 1])


def _converted(missing: list, extra: list) -> set:
    """The decoder layers whose names differ as a conversion on load explains: names the skeleton needs missing
    and unexpected ones stored in the same layer (transformers renames inside a layer, e.g. MiniMax's
    block_sparse_moe.experts.N.w1 into mlp.experts.gate_up_proj, experts core/moe.py keeps fused). A tensor
    missing with nothing extra beside it, or one outside the layers (the embedding, the final norm), is never a
    conversion."""
    return ({_layer(n) for n in missing} & {_layer(n) for n in extra}) - {None}


def _linears(skeleton, packed: dict, index: dict) -> dict:
    """{module: (in, out)} of every linear an adapter may correct: the packed ones, and the skeleton's plain
    nn.Linear modules (without a skeleton, every 2-D `weight` stored)."""
    out = {}
    if skeleton is not None:
        import torch.nn as nn

        out = {n: (m.in_features, m.out_features) for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
    else:
        out = {n[:-7]: (s[1], s[0]) for n, (_, _, s) in index.items() if n.endswith(".weight") and len(s) == 2}
    return {**out, **packed}


def _check_adapter(d: Path, linears: dict) -> None:
    """The low-rank adapter OUT/lowrank (safety.scan_folder has checked its entries with the export's): no pickle,
    a checked adapter_config.json, checked headers, and each LoRA pair [r, in] and [out, r] for a linear the
    export has. Its values are checked for NaN where they are read (lowrank.read_adapter)."""
    from compress_export.io.lowrank import adapter_config, split_key

    pickles = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.suffix in safety.PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{d} holds pickle files ({_clean(', '.join(pickles[:3]))}); pickles are never loaded: "
            "remove them (the adapter is read from adapter_model.safetensors only)"
        )
    r = adapter_config(d)["r"]
    f = d / "adapter_model.safetensors"
    if not f.is_file():
        raise UserError(f"{d} has no adapter_model.safetensors; write or download the export again")
    headers = {g: model_io.safetensors_header(g) for g in sorted(d.rglob("*.safetensors"))}
    problems, pairs = [], defaultdict(set)
    for name, info in headers[f].items():
        if name == "__metadata__":
            continue
        key = split_key(name)
        if key is None:
            problems.append(f"{_clean(name)} is not a LoRA factor name (base_model.model.<module>.lora_A.weight)")
            continue
        mod, which = key
        pairs[mod].add(which)
        if mod not in linears:
            problems.append(f"{_clean(name)} corrects {_clean(mod)}, not a linear of this export")
            continue
        in_f, out_f = linears[mod]
        want = [r, in_f] if which == "A" else [out_f, r]
        if info["shape"] != want:
            problems.append(
                f"{_clean(name)} has shape {info['shape']}; rank {r} on a {out_f}×{in_f} linear needs {want}"
            )
        elif info["dtype"] not in FLOAT_TAGS:
            problems.append(f"{_clean(name)} is {info['dtype']}; LoRA factors are floats")
    problems += [
        f"{_clean(m)} has lora_{''.join(sorted(w))} only; a LoRA pair needs A and B"
        for m, w in sorted(pairs.items())
        if w != {"A", "B"}
    ]
    if problems:
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems, e.g. {'; '.join(problems[:SHOWN])}"
        raise UserError(f"{f} does not match the export: {head}; write or download the export again")


def _dtype_fits(tag: str, want) -> bool:
    """Integer tensors must have exactly the format's width (packed words are read as such); float ones may be any
    float dtype, as our readers and engines cast them (llm-compressor writes bf16 scales for bf16 models)."""
    if want.is_floating_point:
        return tag in FLOAT_TAGS
    return tag == INT_TAGS.get(_dtype_name(want))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _refusal(p: Path, cfg: dict, problems: list) -> str:
    shown = "; ".join(x if x.isprintable() else repr(x)[1:-1] for x in problems[:SHOWN])  # one line, always
    head = shown if len(problems) == 1 else f"{len(problems)} problems, e.g. {shown}"
    if any(" has shape " in x or "weight_shape says" in x for x in problems):
        sizes = ", ".join(f"{k}={cfg[k]}" for k in SIZE_FIELDS if k in cfg)
        fix = (
            f"config.json's sizes ({sizes}) must describe these tensors: fix config.json, or write or "
            "download the export again"
        )
    else:
        fix = "the export is incomplete or was altered: write or download it again"
    return f"{p} does not match its config.json: {head}; {fix}"


# eval's other inputs -------------------------------------------------------------------------------------------


def read_eval_text(path) -> str:
    """--text: a file of UTF-8 text that is not empty."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--text {path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"--text {path} is empty: give a text to score")
    return text


def check_eval_windows(path, text: str, tokenizer, window: int) -> None:
    """The text holds at least one window of the model's tokens (evaluate.cut_windows needs one)."""
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n < window:
        raise UserError(
            f"--text {path} has {n} tokens, fewer than one {window}-token window: give a longer text "
            "or a smaller --window"
        )


def check_perplexity(model_dir, result: dict, text, engine: str) -> None:
    """A perplexity that is not a finite number means the model computed NaN or Inf: refuse to report it."""
    bad = {
        k: result.get(k)
        for k in ("token_perplexity", "word_perplexity", "byte_perplexity")
        if not isinstance(result.get(k), (int, float)) or not math.isfinite(result[k])
    }
    if bad:
        k, v = next(iter(bad.items()))
        dtype = "; the engine dtype (try --dtype float32)" if engine == "vllm" else ""
        raise UserError(
            f"{model_dir} computes non-finite values on --text {text} ({k.replace('_', ' ')} {v}): "
            f"check its tensors for overflowing values (scales, norm weights, embeddings), config.json's "
            f"rms_norm_eps and rope settings{dtype}; compare with the unquantized model"
        )


def packed_linears(path: Path, fmt, scheme, qcfg: dict, index=None, headers=None) -> dict:
    """{module name: (in_features, out_features)} of every packed linear, from the headers (`index`:
    model_io.tensor_index of path, read here when not given; `headers` caches the headers weight_shape needs).
    Shared with integrations/tp_plan.py, which plans tensor-parallel shards from the same shapes."""
    import torch

    index = model_io.tensor_index(path) if index is None else index
    headers = {} if headers is None else headers
    primary = fmt.primary_tensor(qcfg)
    out = {}
    for name, (f, _, _) in index.items():
        if not name.endswith("." + primary):
            continue
        mod = name[: -len(primary) - 1]
        t = {
            k[len(mod) + 1 :]: torch.empty(shape, device="meta")
            for k, (_, _, shape) in index.items()
            if k.startswith(mod + ".") and "." not in k[len(mod) + 1 :]
        }
        if "weight_shape" in t:  # compressed-tensors records the shape as two numbers, the only data read here
            ws = mod + ".weight_shape"
            t["weight_shape"] = torch.tensor(stored_ints(index[ws][0], ws, headers), dtype=torch.int64)
        # per-module overrides: the module's own bits give its input width
        out[mod] = fmt.linear_shape(t, fmt.module_scheme(qcfg, mod, scheme))
    return out
