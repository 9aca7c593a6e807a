"""Model structure as data: where the decoder layers are, which linears are compressed, which are kept.

Linears that read the same input (q/k/v, gate/up) are not listed here: the pipeline finds them at run time by
tensor identity, which holds for any architecture, and shares one set of statistics between them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch.nn as nn

from compress_export.core.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]
    layers: str = "model.layers"
    # Regexes over a linear's name inside a decoder layer; targets minus ignore are compressed.
    targets: Tuple[str, ...] = (r".*",)
    ignore: Tuple[str, ...] = ()
    # the norm between the last decoder layer and the output head (mixed precision's sensitivity runs the head)
    final_norm: str = "model.norm"


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo", "olmo2")),
    # MoE: the attention linears and every expert's linears (core/moe.py unfuses transformers 5's fused 3-D
    # experts) are compressed. Routers never.
    Family(
        "mixtral",
        ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"),
        ignore=(r".*\.gate$", r".*router.*", r".*shared_expert_gate$"),
    ),
    Family("neox", ("gpt_neox",), layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm"),
    Family("opt", ("opt",), layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm"),
)
# Linears that read one input and that engines run fused, under the fused module's name (vLLM's
# packed_modules_mapping for Llama-like models): a per-module scheme must hold for the fused name too.
FUSED_LINEARS = {
    ("q_proj", "k_proj", "v_proj"): "qkv_proj",
    ("gate_proj", "up_proj"): "gate_up_proj",
    ("q_a_proj", "kv_a_proj_with_mqa"): "fused_qkv_a_proj",  # DeepSeek's MLA, when q_lora_rank is set
}
GENERIC_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.language_model.layers",
    "transformer.blocks",
)
GENERIC_FINAL_NORMS = (
    "model.norm",
    "model.final_layernorm",
    "transformer.ln_f",
    "model.language_model.norm",
    "transformer.norm_f",
)


@dataclass(frozen=True)
class ScaleMapping:
    """AWQ: `smooth` (a norm, or a linear whose output rows feed the balance linears) absorbs 1/s; the balance
    linears, which all read smooth's output, absorb s on their input columns. Names are local to a decoder layer.
    `when_shapes_match`: apply only if smooth's output width equals the balance linears' input width (v_proj →
    o_proj breaks under grouped-query attention). `inspect`: the module whose output scores a scale when AWQ
    scores on the block (AutoAWQ's module2inspect); None scores the balance linears' own output."""

    smooth: str
    balance: Tuple[str, ...]
    when_shapes_match: bool = False
    inspect: Optional[str] = None
    optional: bool = False  # skipped in a layer lacking its modules (a MoE model's dense layers, or its MoE ones)


_LLAMA_AWQ = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), inspect="self_attn"),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), when_shapes_match=True),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)
# model_type → mappings. Only families whose norms scale as y = w·x̂ (so 1/s folds into w) and whose layer
# structure matches are listed; Gemma's (1 + w) norms and Phi-3's fused projections need their own entries.
# MoE (experts unfused into linears by core/moe.py; "{e}" expands to each expert of the layer): an expert's up_proj
# output feeds only its own down_proj, so that pair is balanced expert by expert, on the tokens routed to it. The
# post-attention norm is not: it feeds the router and every expert, each on its own subset of tokens, and a scale
# folded into it would change the routing unless the router absorbed it too.
# Dense layers of a MoE model (`mlp_only_layers`, `decoder_sparse_step`) get the Llama MLP's mappings.
_MOE_AWQ = (
    *_LLAMA_AWQ[:2],
    ScaleMapping("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",)),
    *(ScaleMapping(m.smooth, m.balance, inspect=m.inspect, optional=True) for m in _LLAMA_AWQ[2:]),
)
AWQ_MAPPINGS = {
    "llama": _LLAMA_AWQ,
    # Mixtral: w1 gate, w3 up, w2 down, in the block its checkpoints name block_sparse_moe (core/moe.py); no dense layers
    "mixtral": (*_LLAMA_AWQ[:2], ScaleMapping("block_sparse_moe.experts.{e}.w3", ("block_sparse_moe.experts.{e}.w2",))),
    "mistral": _LLAMA_AWQ,
    "qwen2": _LLAMA_AWQ,
    "qwen3": _LLAMA_AWQ,
    "qwen3_moe": _MOE_AWQ,
    "olmoe": _MOE_AWQ,  # its q/k norms act after q_proj/k_proj, on their outputs: the input scale still folds
    "qwen2_moe": (
        *_MOE_AWQ,
        ScaleMapping("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), optional=True),
    ),
}
# SmoothQuant: only the norms feeding q/k/v and gate/up absorb scales, as in the paper and llm-compressor's default
# mappings (a norm's per-channel weight takes 1/s for free; v→o and up→down, which AWQ also balances, are left).
_LLAMA_SMOOTH = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
SMOOTH_MAPPINGS = {"llama": _LLAMA_SMOOTH, "mistral": _LLAMA_SMOOTH, "qwen2": _LLAMA_SMOOTH, "qwen3": _LLAMA_SMOOTH}
# AWQ's clip search skips the query and key projections in AutoAWQ and llm-compressor: their output error is not
# what attention sees (it sees q·kᵀ). Measured on SmolLM2 in benchmarks/awq_variants.py.
AWQ_NO_CLIP = r"(^|\.)(q_proj|k_proj|query|key)$"

# How vLLM splits linears under tensor parallelism: these along their inputs (row-parallel), every other along
# its outputs (column-parallel); key/value projections are repeated whole when there are fewer KV heads than ranks.
ROW_PARALLEL = r"(^|\.)(o_proj|down_proj|out_proj|fc2|dense|dense_4h_to_h|experts\.\d+\.w2)$"  # Mixtral's down
KV_PROJECTIONS = r"(^|\.)(k_proj|v_proj)$"

# Never compressed: the output head and embeddings stay in the source precision by default.
ALWAYS_KEEP = (r"(^|\.)lm_head$", r"embed", r"wte$", r"wpe$")


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return Family("generic", (model_type,), layers="")


def _get(model: nn.Module, path: str):
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class ModelLayout:
    family: Family
    layers_path: str
    layers: nn.ModuleList
    # per decoder layer: [(local name, nn.Linear)] in module order
    linears: List[List[Tuple[str, nn.Linear]]] = field(default_factory=list)
    # full names of weight tensors no nn.Linear owns that hold several matrices (transformers 5 fuses MoE experts
    # into [experts, out, in] parameters): not compressed yet, so written as they are and reported
    fused_dense: List[str] = field(default_factory=list)

    def full_name(self, i: int, local: str) -> str:
        return f"{self.layers_path}.{i}.{local}"


def final_norm(model: nn.Module, layout: ModelLayout) -> str:
    """The path of the module between the last decoder layer and the output head, or a UserError naming where it
    looked (works on a weightless skeleton: only the module tree is read)."""
    paths = (layout.family.final_norm, *GENERIC_FINAL_NORMS)
    for path in paths:
        if isinstance(_get(model, path), nn.Module):
            return path
    parent, _, leaf = layout.family.final_norm.rpartition(".")
    owner = _get(model, parent) if parent else model
    if owner is not None and hasattr(owner, leaf):  # the family has one; this config set it to None
        # (OPT-350m: do_layer_norm_before=false leaves final_layer_norm None, and project_out maps to the head)
        get_head = getattr(model, "get_output_embeddings", None)
        width = getattr(get_head() if callable(get_head) else None, "in_features", None)
        between = [  # a linear beside the layers that feeds the head's width (OPT's project_out, not project_in)
            f"{parent}.{n}" for n, m in owner.named_children() if isinstance(m, nn.Linear) and m.out_features == width
        ]
        raise UserError(
            f"{type(model).__name__} has no final norm in this configuration ({layout.family.final_norm} is None)"
            + (f" and runs {', '.join(between)} before the output head" if between else "")
            + ": mixed precision's sensitivity sweep runs a final norm and the head only; drop --avg-bits/--size-mb "
            "and give one --bits for this model"
        )
    raise UserError(
        f"no final norm found after the decoder layers (looked for {', '.join(dict.fromkeys(paths))}): "
        f"{type(model).__name__} needs an entry in core/structure.py's FAMILIES for this step"
    )


def describe(model: nn.Module, where: str = "model") -> ModelLayout:
    """Find the decoder layers and their compressible linears, or say clearly why there are none."""
    fam = family_for(getattr(model.config, "model_type", ""))
    paths = (fam.layers,) if fam.layers else GENERIC_LAYER_PATHS
    for path in paths:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers):
            break
    else:
        raise UserError(
            f"{where}: no decoder layers found (looked for {', '.join(paths)}); "
            f"architecture {type(model).__name__} is not supported"
        )
    layout = ModelLayout(fam, path, layers)
    for layer in layers:
        found = []
        for name, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            if not any(re.fullmatch(t, name) for t in fam.targets):
                continue
            if any(re.fullmatch(p, name) or re.search(p, name) for p in fam.ignore + ALWAYS_KEEP):
                continue
            found.append((name, mod))
        layout.linears.append(found)
    layout.fused_dense = [
        f"{path}.{i}.{n}" for i, layer in enumerate(layers) for n, p in layer.named_parameters() if p.dim() == 3
    ]
    if not any(layout.linears):
        raise UserError(f"{where}: {type(model).__name__} has no nn.Linear layers to compress in {path}")
    return layout
