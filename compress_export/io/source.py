"""Where a source model's weights come from while it is compressed: streamed from disk a decoder layer at a time,
or (when streaming cannot work) the whole model in memory.

Streaming builds the model with its parameters on the meta device (no memory; buffers such as rotary tables stay
real), reads each decoder layer's tensors from the memory-mapped safetensors shards just before it is compressed
and drops them right after, so peak memory is one layer plus the calibration activations whatever the depth.
Both kinds answer the same questions, so the pipeline has one code path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from compress_export.core import hardware
from compress_export.core.errors import UserError
from compress_export.core.moe import unfuse_experts
from compress_export.io import model_io, safety

log = logging.getLogger(__name__)


def _deduped_state_names(module: nn.Module) -> list:
    """Parameter and persistent-buffer names, each tied tensor once (under its first name), in state_dict order."""
    keep = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return [n for n in module.state_dict(keep_vars=True) if n in keep]


class InMemorySource:
    """The whole model loaded by transformers (data-free calibration generates text with it; checkpoints whose
    tensor names transformers rewrites on load, such as fused MoE experts, need its conversions)."""

    streamed = False

    def __init__(self, src: Path, trust_remote_code: bool = False):
        self.src = src
        self.model, self.tokenizer = model_io.load_source_model(src, trust_remote_code=trust_remote_code)
        model_io.check_finite(self.model, str(src))

    def load_inputs(self, layers_path: str) -> None:
        """The modules before the first decoder layer are already there."""

    def release_inputs(self, layers_path: str) -> None:
        pass

    def load_outer(self, path: str) -> nn.Module:
        """One module outside the decoder layers (the final norm), its weights real."""
        return self.model.get_submodule(path)

    def release_outer(self, path: str) -> None:
        pass

    def load_layer(self, layout, i: int) -> nn.Module:
        return layout.layers[i]

    def release_layer(self, layout, i: int) -> None:
        layout.layers[i].to("cpu")

    def unload_layer(self, layout, i: int) -> None:
        """Free layer i's weights so that load_layer can read it again (a measuring sweep before the pass)."""
        self.release_layer(layout, i)

    def head_tensors(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The output head's (weight [vocab, hidden], bias or None)."""
        head = _output_head(self.model)
        return head.weight.detach(), None if getattr(head, "bias", None) is None else head.bias.detach()

    def outer_tensors(self, layers_path: str) -> Iterator[Tuple[str, torch.Tensor]]:
        """Every tensor outside the decoder layers, each shared tensor once."""
        seen = set()
        for name, t in self.model.state_dict().items():
            key = (t.data_ptr(), tuple(t.shape))
            if name.startswith(layers_path + ".") or key in seen:
                continue
            seen.add(key)
            yield name, t


class StreamedSource:
    """Parameters on the meta device; tensors read from the shards (memory-mapped) only while they are used."""

    streamed = True

    def __init__(self, src: Path, model: nn.Module, tokenizer, where: Dict[str, Path], names: list):
        self.src, self.model, self.tokenizer, self._where = src, model, tokenizer, where
        self._files = {}
        self._names = names  # every tensor to write, each shared one once (fixed while tied tensors are shared)

    @classmethod
    def try_open(cls, src: Path, model: nn.Module, index: dict, trust_remote_code: bool = False):
        """(source, "") when every tensor of `model` (a skeleton) maps one to one onto a checkpoint tensor of
        `index` (model_io.tensor_index), else (None, why not)."""
        tied_head = _tied_head_name(model)  # before any read: reading the embeddings in unties them
        names = [n for n in _deduped_state_names(model) if n != tied_head]
        missing = sorted(set(names) - set(index))
        extra = sorted(set(index) - set(names) - {tied_head})
        if missing or extra:
            example = (missing or extra)[0]
            return None, (
                f"the checkpoint's tensor names differ from the model's ({len(missing)} missing, "
                f"{len(extra)} extra, e.g. {example}); transformers' own loader converts them"
            )
        tokenizer = model_io.load_tokenizer(src, trust_remote_code)
        return cls(src, model, tokenizer, {n: f for n, (f, _, _) in index.items()}, names), ""

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._where[name]
        if f not in self._files:
            self._files[f] = safe_open(str(f), framework="pt")
        try:
            t = self._files[f].get_tensor(name)
        except Exception as e:  # the header was checked up front: this is damage inside the data
            raise UserError(f"{f}: cannot read tensor {name} ({e}); the file is damaged: download it again") from None
        model_io.check_tensor_finite(t, name, f)
        return t

    def _materialize(self, module: nn.Module, prefix: str) -> None:
        """Give every meta parameter/persistent buffer of `module` its checkpoint value, in float32 (as the
        in-memory path loads it) unless it is not a float tensor."""
        for local in _deduped_state_names(module):
            t = self._read(prefix + local)
            owner_name, _, attr = local.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if t.is_floating_point():
                # a copy in every case, so no tensor of the layer keeps the mapped file alive (see _close)
                t = t.to(torch.float32) if t.dtype != torch.float32 else t.clone()
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[attr] = t

    def _outer_modules(self, layers_path: str):
        """The direct children on the path to the layers, except the decoder stack and the output head."""
        head = self.model.get_output_embeddings()
        parts = layers_path.split(".")
        for depth in range(len(parts)):
            parent = self.model.get_submodule(".".join(parts[:depth])) if depth else self.model
            for name, child in parent.named_children():
                full = ".".join([*parts[:depth], name])
                if name == parts[depth] or child is head:
                    continue
                yield full, child
            # parameters held by the parent itself (rare) are outer tensors too, written from the file later

    def load_inputs(self, layers_path: str) -> None:
        """The embeddings (and whatever else runs before the first layer) for capturing calibration inputs."""
        for full, child in self._outer_modules(layers_path):
            self._materialize(child, full + ".")

    def release_inputs(self, layers_path: str) -> None:
        self._close()
        for _, child in self._outer_modules(layers_path):  # parameters only: buffers (rotary tables) stay real
            _parameters_to_meta(child)

    def load_outer(self, path: str) -> nn.Module:
        """One module outside the decoder layers (the final norm) read from the file; release_outer frees it."""
        module = self.model.get_submodule(path)
        self._materialize(module, path + ".")
        self._close()
        return module

    def release_outer(self, path: str) -> None:
        _parameters_to_meta(self.model.get_submodule(path))

    def load_layer(self, layout, i: int) -> nn.Module:
        hardware.release_free_heap()  # the previous layer's freed memory off the resident set: flat in depth
        layer = layout.layers[i]
        self._materialize(layer, layout.full_name(i, ""))
        self._close()  # the layer is in memory now; its mapped source pages need not stay resident while it runs
        return layer

    def release_layer(self, layout, i: int) -> None:
        layout.layers[i].to("meta")  # frees it; the layer is not used again
        self._close()

    def unload_layer(self, layout, i: int) -> None:
        """Parameters back on meta (freed); buffers stay real: a non-persistent one (a per-layer rotary table) is
        not in the checkpoint, and load_layer restores only what is."""
        _parameters_to_meta(layout.layers[i])
        self._close()

    def _close(self) -> None:
        """Unmap the shards: pages of a memory-mapped file count in the process's resident memory while mapped."""
        self._files.clear()

    def head_tensors(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The output head's (weight, bias or None) read from the file in float32 (the embedding's weight when
        they are tied); the caller drops them when done."""
        head = _output_head(self.model)
        name = _name_of(self.model, head)
        weight = f"{name}.weight"
        if weight not in self._where:  # tied: stored once, under the input embedding
            weight = f"{_name_of(self.model, self.model.get_input_embeddings())}.weight"
        has_bias = getattr(head, "bias", None) is not None
        try:
            return self._read(weight).float(), self._read(f"{name}.bias").float() if has_bias else None
        finally:
            self._close()

    def outer_tensors(self, layers_path: str) -> Iterator[Tuple[str, torch.Tensor]]:
        """Every tensor outside the decoder layers, read from the file one at a time (source precision)."""
        for name in self._names:
            if not name.startswith(layers_path + "."):
                yield name, self._read(name)
                self._close()


def _parameters_to_meta(module: nn.Module) -> None:
    """Free every parameter of `module` (moved to the meta device, shapes kept); its buffers stay as they are."""
    for owner in module.modules():
        for attr, p in list(owner._parameters.items()):
            if p is not None:
                owner._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=False)


def build_skeleton(src: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model from config.json with every parameter on the meta device: its structure and shapes for the
    checks before any weight is read, at no memory cost."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    safety.check_remote_code(src, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
        with init_empty_weights():  # parameters on meta; buffers (rotary tables) computed for real
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (config.json is a stranger's: zero heads, strings for sizes, ...)
        raise UserError(
            f"{src}: transformers cannot build this model from config.json ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})"
        ) from None
    model.tie_weights()  # from_pretrained ties after loading; the skeleton must share the same tensors
    unfuse_experts(model, model_io.tensor_index(src))  # per-expert linears, as the checkpoint stores them
    return model.eval()


def _output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UserError(f"{type(model).__name__} has no output head transformers can name (get_output_embeddings)")
    return head


def _name_of(model: nn.Module, module: nn.Module) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module), None)


def _tied_head_name(model: nn.Module) -> Optional[str]:
    """The output head's weight name when it is the input embedding itself (written once, under the embedding)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return None
    name = _name_of(model, head)
    return None if name is None else f"{name}.weight"


def open_source(
    src: Path,
    skeleton: nn.Module,
    index: dict,
    stream: Optional[bool],
    needs_model_forward: bool,
    trust_remote_code: bool = False,
):
    """A StreamedSource over `skeleton` when it can work (and `stream` is not False), else the whole model in
    memory.

    needs_model_forward: data-free calibration generates text with the whole model, so it cannot stream.
    """
    if stream is not False:
        why = (
            (
                "data-free calibration (--dataset self) generates text with the whole model (give another "
                "--dataset, or none, to stream)"
            )
            if needs_model_forward
            else ""
        )
        if not why:
            source, why = StreamedSource.try_open(src, skeleton, index, trust_remote_code)
            if source is not None:
                return source
        if stream:
            raise UserError(f"{src}: cannot stream this model layer by layer: {why}")
        log.info("loading the whole model into memory: %s", why)
    return InMemorySource(src, trust_remote_code)


FLOAT_TAGS = ("F64", "F32", "F16", "BF16")


def check_tensors(src: Path, model: nn.Module, index: dict) -> None:
    """Before any weight is read: the tensors the skeleton (built from config.json) needs are in the checkpoint
    (`index`: model_io.tensor_index) with the shapes config.json implies, float ones stored as floats. When the
    names differ both ways (a checkpoint whose names transformers converts on load, such as fused MoE experts),
    the whole-model load checks what it finds instead (model_io.load_source_model)."""
    tied_head = _tied_head_name(model)
    state = model.state_dict(keep_vars=True)
    names = [n for n in _deduped_state_names(model) if n != tied_head]
    missing = [n for n in names if n not in index]
    if missing and not set(index) - set(names) - {tied_head}:
        raise UserError(
            f"{src}: {len(missing)} tensor(s) the model needs are missing from its safetensors files "
            f"(e.g. {', '.join(missing[:3])}); the checkpoint is incomplete: download it again"
        )
    problems = []
    for n in names:
        if n not in index:
            continue
        f, tag, shape = index[n]
        want = tuple(state[n].shape)
        if tuple(shape) != want:
            problems.append(f"{n} in {f.name} has shape {list(shape)}, config.json implies {list(want)}")
        elif state[n].is_floating_point() and tag not in FLOAT_TAGS:
            problems.append(f"{n} in {f.name} is stored as {tag}, not a float dtype")
    if problems:
        raise UserError(
            f"{src}: {len(problems)} tensor(s) do not match config.json: {'; '.join(problems[:3])}; "
            "the checkpoint and its config.json disagree: download them again"
        )
