"""Mixture-of-experts layers as one nn.Linear per expert projection.

transformers 5 keeps a MoE layer's experts as two fused 3-D parameters (`gate_up_proj` [experts, 2·inter, hidden],
gate rows first, and `down_proj` [experts, hidden, inter]) and runs them with grouped_mm. The passes compress
nn.Linear layers and calibrate them from the inputs they see, and every engine reads per-expert linears from the
checkpoint (`mlp.experts.E.gate_proj.qweight`, ...). So the fused module is replaced by ExpertLinears: the same
function, computed by transformers' own eager routing loop over ordinary linears. Each expert's linears then see
exactly the tokens the router sends them, which is routing-aware calibration for free, and their names are the
names transformers itself writes on save, so a checkpoint streams a layer at a time with no renaming.

Which model types are unfused (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3), and the names their experts' linears
take, is data (EXPERT_NAMES). A model type not listed keeps its fused experts (reported as unquantized by the
pipeline).

Where a family's checkpoints name the MoE block otherwise than transformers' module tree does (Mixtral's
`block_sparse_moe`, which vLLM reads too, against transformers' `mlp`), the unfused block is registered under the
checkpoint's name (STORED_BLOCK), so every name the tool reads, writes or lists in a quantization config is the
checkpoint's, with no renaming anywhere else; the decoder layer's own forward still finds it as `self.mlp`.
"""

from __future__ import annotations

import re
from typing import Tuple

import torch
import torch.nn as nn

# model_type → (gate, up, down) projection names of one expert, as its checkpoints store them
# (transformers' own conversion mapping reads these families' per-expert checkpoints under these names too)
EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),  # Mixtral, and vLLM's FusedMoE ckpt_names for it
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),  # DeepSeek-V3/R1 and Kimi-K2-shaped: MLA attention
}

# model_type → (the MoE block's attribute in transformers' decoder layer, the name its checkpoints store it under)
STORED_BLOCK = {"mixtral": ("mlp", "block_sparse_moe")}


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) · up(x)), its projections under the checkpoint's names."""

    def __init__(self, names: Tuple[str, str, str], hidden: int, inter: int, act, device, dtype):
        super().__init__()
        self.names, self.act_fn = names, act
        gate, up, down = names
        kw = dict(bias=False, device=device, dtype=dtype)
        self.add_module(gate, nn.Linear(hidden, inter, **kw))
        self.add_module(up, nn.Linear(hidden, inter, **kw))
        self.add_module(down, nn.Linear(inter, hidden, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """A drop-in for transformers' fused experts module: forward(hidden [tokens, hidden], top_k_index [tokens, k],
    top_k_weights [tokens, k]) → [tokens, hidden], each expert run once on the tokens routed to it (in one call, so
    a linear's input in one forward is every token it serves) and weighted by its routing weight."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _fused_shapes(mod: nn.Module):
    """(experts, hidden, inter) when `mod` is a fused experts module of the layout above, else None."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not isinstance(gu, nn.Parameter) or not isinstance(dn, nn.Parameter) or gu.dim() != 3 or dn.dim() != 3:
        return None
    if any(p.dim() for n, p in mod.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj")):
        return None  # expert biases (gpt-oss) or other per-expert tensors: a layout not handled here
    if getattr(mod, "is_transposed", False) or not hasattr(mod, "act_fn"):
        return None
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(dn.shape) != (e, h, two_i // 2):
        return None
    return e, h, two_i // 2


def _unfused(mod: nn.Module, names) -> ExpertLinears:
    e, h, inter = _fused_shapes(mod)
    gu, dn = mod._parameters["gate_up_proj"], mod._parameters["down_proj"]  # both checked by _fused_shapes
    assert gu is not None and dn is not None
    out = ExpertLinears()
    for i in range(e):
        # built on meta (no initialisation, no memory), then given its own rows: the fused tensors are freed when
        # the caller drops the module, so a loaded layer is held twice at most, never the model
        expert = ExpertMLP(names, h, inter, mod.act_fn, "meta", gu.dtype)
        for proj, rows in zip(names, (gu.data[i, :inter], gu.data[i, inter:], dn.data[i])):
            lin = getattr(expert, proj)
            lin.weight = nn.Parameter(rows if rows.is_meta else rows.clone(), requires_grad=False)
        out.append(expert)
    return out


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def unfuse_experts(model: nn.Module, stored=None) -> int:
    """Replace every fused experts module of `model` (built from config, on meta or loaded) by ExpertLinears, in
    place, when its model type is in EXPERT_NAMES; returns how many were replaced. `stored`: the checkpoint's
    tensor names, when the model is to be filled from them: a checkpoint that stores its experts fused (an export
    written before experts were unfused) keeps the fused modules, so its names still match."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    names = EXPERT_NAMES.get(model_type)
    if names is None or (stored is not None and not any(_PER_EXPERT.search(k) for k in stored)):
        return 0
    found = [n for n, m in model.named_modules() if _fused_shapes(m) is not None]
    for name in found:  # names, not modules: each fused module is released as soon as it is replaced
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _unfused(getattr(owner, child), names))
    attr_name, stored_name = STORED_BLOCK.get(model_type, ("", ""))
    for name in found if stored_name else ():
        block, _, _ = name.rpartition(".")
        layer, _, attr = block.rpartition(".")
        if attr == attr_name:
            _store_as(model.get_submodule(layer), attr, stored_name)
    return len(found)


def _store_as(layer: nn.Module, attr: str, stored: str) -> None:
    """Register `layer`'s child `attr` under the name `stored` instead, in the same place among its children: the
    state dict, named_modules and .to() see only `stored`; the layer's forward, which calls self.<attr>, reaches
    the same module through a plain instance attribute, which nn.Module's traversals do not visit."""
    block = layer._modules[attr]
    layer._modules = {stored if k == attr else k: m for k, m in layer._modules.items()}
    object.__setattr__(layer, attr, block)


def expert_index(name: str) -> int:
    """The expert number in a linear's name ("model.layers.1.mlp.experts.3.up_proj" → 3), or -1 for a linear
    that belongs to no expert list."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "experts" and b.isdigit():
            return int(b)
    return -1
