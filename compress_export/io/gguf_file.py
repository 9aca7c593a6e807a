"""An export's numbers as one GGUF file, for llama.cpp (and anything else that reads GGUF).

The quantized linears go in as the GGUF block types that hold them exactly (formats/gguf.py); the tensors
around them as llama.cpp's own converter writes them: norms and biases F32, and the token embedding (and an
untied lm_head, which no pass quantizes) as Q8_0 by default, rounded by the gguf package's own quantizer
(`embeddings="f16"` keeps them wider). Names and metadata keys are the gguf package's (its tensor name map and
GGUFWriter), the tokenizer is read from the export's tokenizer.json (byte-level BPE) and its special tokens and chat
template by gguf's SpecialVocab, from private copies of the files. llama.cpp's llama architecture wants q_proj and
k_proj rows interleaved for its rotary embedding: each head's two halves are reordered, a row permutation that
moves codes, scales and zero points together, so the numbers stay exact.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from compress_export.core.errors import UserError
from compress_export.formats import gguf as blocks
from compress_export.io import safety

log = logging.getLogger("compress_export")

# model_type → the GGUF architecture and whether llama.cpp's rotary layout wants q/k rows interleaved
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
)
FILE_TYPES = {blocks.Q4_0: 2, blocks.Q4_1: 3, blocks.Q8_0: 7}  # llama_ftype MOSTLY_Q4_0 / MOSTLY_Q4_1 / MOSTLY_Q8_0
EMBEDDINGS = ("q8_0", "f16")
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def check_architecture(cfg: dict) -> tuple:
    """(GGUF architecture, permute q/k) for a config.json, or a UserError saying what is not written."""
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise UserError(f"--format gguf writes these model types: {', '.join(ARCHS)}; model_type {mt!r} is not one")
    for key in ("rope_scaling", "rope_parameters"):  # transformers 5 keeps the rope type in rope_parameters
        rope = cfg.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
        if kind not in ("default", None):
            raise UserError(f"--format gguf: rope type {kind!r} (config.json {key}) is not written to GGUF yet")
    return ARCHS[mt]


def qk_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's llama wants for a q or k projection of `heads` heads: within each head, row
    2j + t of the result is row t·(d/2) + j of the Hugging Face weight (t ∈ {0, 1}: the rotary halves)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, 2, half).transpose(1, 2).reshape(-1)


def _permuted(qw, order: torch.Tensor):
    from dataclasses import replace

    return replace(
        qw,
        codes=qw.codes[order],
        scales=qw.scales[order],
        zeros=qw.zeros[order],
        bias=None if qw.bias is None else qw.bias[order],
    )


def pre_tokenizer(tok: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, read from tokenizer.json's structure
    (as data: the shapes we know), "default" otherwise."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    return "default"


def check_tokenizer(folder: Path, copy: Optional[Path] = None) -> dict:
    """The folder's tokenizer.json (read from `copy` when given) when GGUF's gpt2 tokenizer model holds it: a
    byte-level BPE; else a UserError naming what it is."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        raise UserError(f"--format gguf: {folder} has no tokenizer.json (GGUF carries the tokenizer)")
    tok = safety.read_json(copy or folder / "tokenizer.json")
    model = tok.get("model") if isinstance(tok, dict) else None
    model = model if isinstance(model, dict) else {}
    decoder = tok.get("decoder") if isinstance(tok.get("decoder"), dict) else {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UserError(
            f"--format gguf writes byte-level BPE tokenizers (GPT-2 style); {folder}/tokenizer.json is "
            f"{model.get('type')!r}{' with byte fallback' if model.get('byte_fallback') else ''}"
        )
    return tok


def _tokenizer(writer, folder: Path, work: Path, vocab_size: int) -> Optional[str]:
    """Tokens, types, merges, special ids and chat template from private copies of the export's tokenizer files.
    Returns a warning when llama.cpp will not pre-tokenize as the source does, else None."""
    import gguf

    roots = safety.allowed_roots(folder)
    for name in TOKENIZER_FILES:
        f = folder / name
        if f.exists():
            safety.check_entry(f, roots, folder)
            safety.copy_file(f, work / name)
    tok = check_tokenizer(folder, work / "tokenizer.json")
    vocab = tok["model"]["vocab"]
    size = int(vocab_size)  # the embedding's rows: llama.cpp wants one token per row (padding rows included)
    added = tok.get("added_tokens") or []
    for i in [*vocab.values(), *(a.get("id") if isinstance(a, dict) else None for a in added)]:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size:
            raise UserError(f"{folder}/tokenizer.json: token id {i!r} is not one of the model's {size} (vocab_size)")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens") or []:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    pre = pre_tokenizer(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(work, load_merges=True, n_vocab=size).add_to_gguf(writer, quiet=True)
    if pre == "default":
        return "its pre-tokenizer is not one we name for llama.cpp; llama.cpp will split text its default way"
    return None


def _metadata(writer, cfg: dict, ggml_type: int, description: str) -> None:
    import gguf

    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    writer.add_name(str(cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or "model"))
    writer.add_description(description)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # always: readers differ in the default they assume (transformers' qwen3: 128)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(FILE_TYPES[ggml_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _float_tensor(name: str, t: torch.Tensor, embeddings: str):
    """(array, raw GGML type or None) for a tensor outside the packed linears."""
    import gguf

    x = t.float().numpy()
    if x.ndim == 1:
        return x.astype(np.float32), None
    if name in ("token_embd.weight", "output.weight") and embeddings == "q8_0" and x.shape[-1] % blocks.BLOCK == 0:
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return x.astype(np.float16), None


def write_gguf(
    path: Path, cfg: dict, qweights: Dict, rest: Dict[str, torch.Tensor], folder: Path, embeddings: str = "q8_0"
) -> dict:
    """Write the GGUF file `path` (the caller renames it into place). Everything is checked before a byte is
    written: the architecture, each linear's block type and zero points, every tensor's GGUF name. Returns
    {"type": name of the block type, "warnings": [...]}."""
    import gguf

    arch, permute = check_architecture(cfg)
    if embeddings not in EMBEDDINGS:
        raise UserError(f"GGUF embeddings {embeddings!r}: choose one of {EMBEDDINGS}")
    types = set()
    for name, qw in qweights.items():
        t, why = blocks.block_type(qw.scheme)
        why = why or blocks.check_codes(qw, t) or blocks.check_scales(qw)
        if why:
            raise UserError(f"{name}: {why}")
        types.add(t)
    if len(types) != 1:
        raise UserError("--format gguf: the linears need different block types; one scheme per export is written")
    ggml_type = types.pop()
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg["num_hidden_layers"])
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    plan = {}
    for hf in [*(f"{n}.weight" for n in qweights), *rest]:
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise UserError(f"--format gguf: tensor {hf} has no GGUF name for a {arch} model")
        plan[hf] = g
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in rest:
        plan.pop("lm_head.weight")  # tied: llama.cpp uses token_embd for the output when output.weight is absent
    writer = gguf.GGUFWriter(str(path), arch)
    with tempfile.TemporaryDirectory(prefix="ce-gguf-") as work:
        warning = _tokenizer(writer, Path(folder), Path(work), cfg["vocab_size"])
    desc = f"compress-export: {blocks.TYPE_NAMES[ggml_type]} from {next(iter(qweights.values())).scheme}"
    _metadata(writer, cfg, ggml_type, desc)
    for name, qw in qweights.items():
        if permute and name.endswith(("q_proj", "k_proj")):
            qw = _permuted(qw, qk_rows(qw.codes.shape[0], heads if name.endswith("q_proj") else kv_heads))
        writer.add_tensor(plan[f"{name}.weight"], blocks.pack_blocks(qw, ggml_type), raw_dtype=ggml_type)
        if qw.bias is not None:
            writer.add_tensor(plan[f"{name}.weight"].replace(".weight", ".bias"), qw.bias.float().numpy())
    for hf, t in rest.items():
        if hf in plan:
            arr, raw = _float_tensor(plan[hf], t, embeddings)
            writer.add_tensor(plan[hf], arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"type": blocks.TYPE_NAMES[ggml_type], "warnings": [warning] if warning else []}
