"""One validator for every verb that reads an export: config.json and the safetensors headers against each other.

Exports come from strangers, so each verb (eval, convert, check, serve, validate, from_pretrained, our vLLM plugin)
first checks, without reading any tensor's data (well under a second even for a 70B export):
  1. the folder (model_io.check_model_dir: config.json, every safetensors header against its file);
  2. a quantization_config that a registered format claims, or the dense format's `compress_export_sparsity`;
  3. the tensor set against the architecture config.json describes, built on the meta device: every nn.Linear
     either packed (all of its format's tensors, with exactly the shapes its layout gives and no others) or
     plain (`weight` [out, in], `bias`), every other parameter and persistent buffer with its shape, nothing
     extra. compressed-tensors' two-number `weight_shape` records are the only data read (16 bytes each).
Every problem found ends as ONE UserError naming the folder, the first few tensors or fields, and what to do.
An unquantized model folder (quantized=False) is checked as a folder only: transformers renames legacy tensor
names when it loads one, so its names are not ours to judge.

Also here: the checks of eval's other inputs (the text and its windows, a non-finite perplexity), which cli.py's
cmd_eval runs for both engines.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import model_io
from .errors import UserError

SHOWN = 3  # problems quoted in the one-line message
FLOAT_TAGS = ("F16", "BF16", "F32", "F64")
INT_TAGS = {"int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL"}
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers", "vocab_size")


@dataclass(frozen=True)
class ExportInfo:
    """What the check established. fmt None: an unquantized model folder (only with quantized=False)."""

    path: Path
    config: dict
    fmt: object = None
    scheme: object = None
    index: dict = field(default_factory=dict)  # {tensor: (file, dtype tag, shape)} (model_io.tensor_index)
    packed: dict = field(default_factory=dict)  # {module: (in_features, out_features)} of every packed linear


def check_export(path, *, quantized: bool = True, what: str = "DIR", lenient: bool = False) -> ExportInfo:
    """Check an export from config.json and the headers; raise one UserError for everything found wrong.
    quantized=False: an unquantized model folder passes too (eval and serve take both).
    lenient (our vLLM plugin): an architecture transformers cannot build (vLLM may know it), or one it builds as
    another class than config.json names, gets each packed linear's own layout checked instead of a refusal."""
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
    return ExportInfo(p, cfg, fmt, scheme, check.index, packed)


def _format(p: Path, cfg: dict, quantized: bool):
    """(format, scheme, quantization_config) of the export; (None, None, None) for an unquantized folder."""
    from compress_export.formats import FORMATS
    from compress_export.formats.base import format_for_config, scheme_from_config

    qcfg = cfg.get("quantization_config")
    if qcfg:  # the same test as load_model's: an empty one is an unquantized model
        try:
            return format_for_config(qcfg), scheme_from_config(qcfg), qcfg
        except UserError as e:
            raise UserError(f"{p}/config.json: {e} (formats read: {', '.join(FORMATS.names())})") from None
    if "compress_export_sparsity" in cfg:  # the dense format: pruned weights stored plain
        return FORMATS.get("dense")(), None, {}
    if quantized:
        raise UserError(f"{p} has no quantization_config: it is not an export (give the folder compress-export "
                        "wrote, or compress this model first)")
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
        raise UserError(f"{p}/config.json: num_hidden_layers {layers} is more than the {len(index)} tensors the "
                        "export holds; fix config.json, or write or download the export again")
    try:
        if not cfg.get("model_type"):
            raise ValueError("config.json has no model_type")
        config = AutoConfig.for_model(cfg["model_type"], **plain)
        with init_empty_weights(include_buffers=True):  # buffers too: hostile sizes must not allocate
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()  # as from_pretrained does: a tied head is the embedding, stored once
    except Exception as e:  # noqa: BLE001  (a hostile config.json can make transformers raise anything)
        if lenient:
            return None
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"{p}/config.json does not describe a model transformers can build ({type(e).__name__}: "
                        f"{why}); fix config.json, or write or download the export again") from None
    archs = cfg.get("architectures") or []
    if lenient and archs and type(model).__name__ not in archs:
        return None  # e.g. a multimodal checkpoint vLLM serves: its tensor names are not this class's
    return model


class _Check:
    """The tensors of one export (from its headers) and the problems found with them."""

    def __init__(self, p: Path, fmt, scheme, qcfg: dict):
        self.p, self.fmt, self.scheme, self.qcfg = p, fmt, scheme, qcfg
        self.problems: list = []
        self.index, self._where = {}, {}  # {name: (file, tag, shape)}, {name: (file, first byte, end byte)}
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                data = 8 + int.from_bytes(fh.read(8), "little")  # where the tensor data starts
            for name, info in model_io.safetensors_header(f).items():
                if name == "__metadata__":
                    continue
                if name in self.index:  # which copy a reader takes is arbitrary
                    raise UserError(f"{p}: tensor {_clean(name)} is stored twice ({self.index[name][0].name} and "
                                    f"{f.name}); the export is damaged: write or download it again")
                self.index[name] = (f, info["dtype"], tuple(int(d) for d in info["shape"]))
                start, end = (int(v) for v in info["data_offsets"])
                self._where[name] = (f, data + start, data + end)
        self.by_module = defaultdict(dict)  # {module: {suffix: (file, tag, shape)}}
        for name, entry in self.index.items():
            mod, _, suffix = name.rpartition(".")
            self.by_module[mod][suffix] = entry

    def against(self, model) -> dict:
        """The tensors against the skeleton's linears, parameters and persistent buffers; returns the packed
        linears {name: (in, out)}."""
        import torch.nn as nn

        fmt, problems = self.fmt, self.problems
        primary = fmt.primary_tensor(self.qcfg) if fmt.primary else None  # the dense format packs nothing
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        packed = {n: (m.in_features, m.out_features) for n, m in linears.items()
                  if primary and self.is_packed(n, m, primary)}
        claimed = {f"{m}.{s}" for m in packed for s in self.by_module[m]}
        seen, done, tied = set(), set(), bool(getattr(model.config, "tie_word_embeddings", False))
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
                    problems.append(f"{name} is missing")
                continue
            claimed.add(name)
            _, tag, shape = self.index[name]
            if shape != tuple(t.shape):
                problems.append(f"{name} has shape {list(shape)}; config.json's model needs {list(t.shape)}")
            elif (tag in FLOAT_TAGS) != t.is_floating_point():
                problems.append(f"{name} is {tag}; the model holds it as {_dtype_name(t.dtype)}")
        problems += [f"{_clean(n)} is not a tensor of this {model.config.model_type} model"
                     for n in sorted(set(self.index) - claimed)]
        return packed

    def is_packed(self, name: str, mod, primary: str) -> bool:
        """Its primary tensor is stored, or (a packed linear that lost it) another tensor only its format's
        layout has, so the missing primary tensor is what gets named."""
        have = self.by_module.get(name, {})
        if primary in have:
            return True
        try:
            layout = self.fmt.tensor_layout(self.scheme, mod.in_features, mod.out_features)
        except (ValueError, TypeError, ZeroDivisionError, KeyError):
            return False
        # `bias`, and a float `weight`, are what a plain linear stores too (W8A8's packed `weight` is int8)
        return any(k in layout and k != "bias" and (k != "weight" or tag not in FLOAT_TAGS)
                   for k, (_, tag, _) in have.items())

    def packed_linear(self, name: str, in_f: int, out_f: int, has_bias: bool) -> None:
        """One packed linear's tensors against the layout its format gives an out_f×in_f linear."""
        fmt, have, problems = self.fmt, self.by_module[name], self.problems
        try:
            layout = fmt.tensor_layout(self.scheme, in_f, out_f)
        except (ValueError, TypeError, ZeroDivisionError, KeyError) as e:
            problems.append(f"quantization_config gives no layout for {name} ({type(e).__name__}: {e})")
            return
        act_order = getattr(self.scheme, "act_order", "none") == "group"
        for k, spec in layout.items():
            if k not in have:
                # an act-order g_idx cannot be left out: the default one would regroup the columns wrongly
                if k not in fmt.optional or (act_order and k.endswith("g_idx")):
                    problems.append(f"{name}.{k} is missing ({fmt.name} stores it for every packed linear)")
                continue
            _, tag, shape = have[k]
            if shape != tuple(spec.shape):
                problems.append(f"{name}.{k} has shape {list(shape)}; a {out_f}×{in_f} linear in this {fmt.name} "
                                f"export needs {list(spec.shape)}")
            elif not _dtype_fits(tag, spec.dtype):
                problems.append(f"{name}.{k} is {tag}; {fmt.name} stores it as {_dtype_name(spec.dtype)}")
            elif k == "weight_shape" and (said := self.ints(f"{name}.{k}")) != [out_f, in_f]:
                problems.append(f"{name}.weight_shape says {said}; the linear is [{out_f}, {in_f}]")
        problems += [f"{name}.{_clean(k)} is not a tensor of a packed {fmt.name} linear"
                     for k in sorted(set(have) - set(layout) - {"bias"})]
        if "bias" in have and (not has_bias or have["bias"][2] != (out_f,)):
            problems.append(f"{name}.bias has shape {list(have['bias'][2])}; the linear has "
                            + (f"{out_f} outputs" if has_bias else "no bias"))
        elif has_bias and "bias" not in have:
            problems.append(f"{name}.bias is missing")

    def layout_only(self) -> dict:
        """Lenient: each packed linear against the layout its own primary tensor implies (its shape read as
        tp_plan reads it), where no skeleton says what the model holds."""
        from compress_export.integrations.tp_plan import packed_linears

        if not self.fmt.primary:
            return {}
        try:
            packed = packed_linears(self.p, self.fmt, self.scheme, self.qcfg)
        except Exception as e:  # noqa: BLE001  (impossible shapes in a hostile header)
            self.problems.append(f"a packed linear has an impossible shape ({type(e).__name__}: {e})")
            return {}
        for name, (in_f, out_f) in packed.items():
            self.packed_linear(name, in_f, out_f, "bias" in self.by_module[name])
        return packed

    def ints(self, name: str) -> list:
        """The int64 values of a tiny tensor (compressed-tensors' weight_shape), read as bytes at the offsets
        its header gives: the only data the check reads (16 bytes a linear)."""
        f, start, end = self._where[name]
        with open(f, "rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start)
        return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw), 8)]


def _dtype_fits(tag: str, want) -> bool:
    """Integer tensors must have exactly the format's width (packed words are read as such); float ones may be any
    float dtype, as our readers and engines cast them (llm-compressor writes bf16 scales for bf16 models)."""
    if want.is_floating_point:
        return tag in FLOAT_TAGS
    return tag == INT_TAGS.get(_dtype_name(want))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _clean(s: str) -> str:
    """A tensor name from a stranger's header, safe to put on one line."""
    s = s if s.isprintable() else repr(s)[1:-1]
    return s if len(s) <= 120 else s[:117] + "..."


def _refusal(p: Path, cfg: dict, problems: list) -> str:
    shown = "; ".join(x if x.isprintable() else repr(x)[1:-1] for x in problems[:SHOWN])  # one line, always
    head = shown if len(problems) == 1 else f"{len(problems)} problems, e.g. {shown}"
    if any(" has shape " in x or "weight_shape says" in x for x in problems):
        sizes = ", ".join(f"{k}={cfg[k]}" for k in SIZE_FIELDS if k in cfg)
        fix = (f"config.json's sizes ({sizes}) must describe these tensors: fix config.json, or write or "
               "download the export again")
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
        raise UserError(f"--text {path} has {n} tokens, fewer than one {window}-token window: give a longer text "
                        "or a smaller --window")


def check_perplexity(model_dir, result: dict, text, engine: str) -> None:
    """A perplexity that is not a finite number means the model computed NaN or Inf: refuse to report it."""
    bad = {k: result.get(k) for k in ("token_perplexity", "word_perplexity", "byte_perplexity")
           if not isinstance(result.get(k), (int, float)) or not math.isfinite(result[k])}
    if bad:
        k, v = next(iter(bad.items()))
        dtype = "; the engine dtype (try --dtype float32)" if engine == "vllm" else ""
        raise UserError(f"{model_dir} computes non-finite values on --text {text} ({k.replace('_', ' ')} {v}): "
                        f"check its tensors for overflowing values (scales, norm weights, embeddings), config.json's "
                        f"rms_norm_eps and rope settings{dtype}; compare with the unquantized model")
