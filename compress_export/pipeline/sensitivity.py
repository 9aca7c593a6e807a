"""How much each linear's weights matter to the model's loss: a token-wise empirical Fisher diagonal,
F[o, j] = Σ_t (∂L/∂y_to)² · x_tj², for every compressed linear y = W x (math/allocate.fisher_diagonal; the
per-token pieces of the gradient of the mean loss, so its scale is arbitrary and only the ranking is used),
measured on the calibration set with the original model. Mixed precision weighs each candidate's rounding error by it,
so a linear whose outputs the rest of the model amplifies (an early layer, a value projection) costs what it
costs at the loss, not at its own output.

It needs one backward pass of the whole model, and it streams like the passes: a forward sweep runs the layers
one at a time and spools each layer's inputs to a temporary directory (safetensors, one file per layer, deleted
at the end), the output head turns the last layer's outputs into the loss gradient, and a backward sweep loads
the layers again from the last to the first, re-runs each on its spooled inputs and carries the gradient down.
Memory holds one layer (and, while it is measured, a float32 sum per linear the size of its weight), two sets of
activations (a layer's inputs and outputs, or the last outputs and their gradients), the final norm and the
head in float32 with one sample's logits and their gradient, and one sample's intermediates of the backward (it
runs a sample at a time): none of it grows with depth. The disk holds the layer inputs (layers × tokens ×
hidden × 4 bytes: SmolLM2 at 64 × 512 tokens, 2.3 GB; an 8B Llama, 17 GB) beside the output, checked for room in
the preflight and again before the first layer.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_export.core.errors import UserError
from compress_export.core.structure import final_norm
from compress_export.io.writer import free_space
from compress_export.math.allocate import fisher_diagonal
from compress_export.passes.sequential import InputGroups, NullStats, capture_states, run_layer, take_rows

Members = List[List[str]]  # per layer: the sets of linear names that read one input


def _spool_path(tmp: str, i: int) -> Path:
    return Path(tmp) / f"layer{i}.safetensors"


@torch.no_grad()
def _forward_sweep(source, layout, hidden: list, kwargs: list, tmp: str, bar) -> Tuple[list, List[Members]]:
    """Each layer's inputs written to the spool; returns the last layer's outputs and every layer's input sets."""
    from safetensors.torch import save_file

    members: List[Members] = []
    for i in range(len(layout.layers)):
        save_file({str(k): h.detach().contiguous().cpu() for k, h in enumerate(hidden)}, str(_spool_path(tmp, i)))
        layer = source.load_layer(layout, i).to(hidden[0].device)
        groups = InputGroups(layout.linears[i], lambda n: NullStats())
        try:
            out = []
            for h, kw in zip(hidden, kwargs):
                out.append(run_layer(layer, h, kw))
                groups.next_batch()
        finally:
            groups.remove()
            source.unload_layer(layout, i)
        members.append(groups.members)
        hidden = out
        bar.update(i + 1)
    return hidden, members


def _logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What some families do to the head's output before the loss (transformers' own forward does the same);
    a multimodal config keeps them in its text_config."""
    config = getattr(config, "text_config", None) or config
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if getattr(config, "logits_scaling", None):  # Granite divides
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):  # Cohere multiplies
        logits = logits * config.logit_scale
    return logits


def _loss_gradients(source, layout, hidden: list, ids: torch.Tensor) -> list:
    """∂L/∂(last layer's output) per batch, L the mean next-token cross-entropy over the calibration set (the
    final norm and the head run one sample at a time: a sample's logits are seq × vocab floats)."""
    path = final_norm(source.model, layout)
    device = hidden[0].device
    try:
        norm = copy.deepcopy(source.load_outer(path)).to(device)  # the model's own copy stays where it is
        weight, bias = (None if t is None else t.to(device) for t in source.head_tensors())
    finally:
        source.release_outer(path)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    grads, row = [], 0
    for h in hidden:
        g = torch.empty_like(h)
        for r in range(h.shape[0]):
            x = h[r : r + 1].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = _logits(source.model.config, F.linear(norm(x), weight, bias)[0, :-1].float())
                loss = F.cross_entropy(logits, ids[row + r, 1:].to(device), reduction="sum") / tokens
                (g[r : r + 1],) = torch.autograd.grad(loss, x)
        grads.append(g)
        row += h.shape[0]
    return grads


def check_spool_room(where: Path, need: int) -> None:
    """The spool (`need` bytes: layers × calibration tokens × hidden × bytes per value) must fit where it goes,
    beside the output (preflight, from config.json, and again before the first layer, from the real states)."""
    where, free = free_space(where)
    if need > free * 0.95:
        raise UserError(
            f"mixed precision's sensitivity sweep spools every layer's calibration inputs beside the output, in "
            f"{where}: it needs {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free; free space there, choose "
            "another -o, or lower --num-samples or --seq-len"
        )


def spool_bytes(layers: int, tokens: int, hidden: int, itemsize: int = 4) -> int:
    return layers * tokens * hidden * itemsize


def _backward_layer(layer, spool: Path, kwargs: list, grads: list, device) -> None:
    """Re-run the layer on its spooled inputs a sample at a time (autograd keeps one sample's intermediates) and
    replace each batch's output gradient by its input gradient."""
    from safetensors import safe_open

    with safe_open(str(spool), framework="pt") as f, torch.enable_grad():
        for k, kw in enumerate(kwargs):
            h = f.get_tensor(str(k)).to(device)
            g_in = torch.empty_like(h)
            for r in range(h.shape[0]):
                x = h[r : r + 1].detach().requires_grad_(True)
                out = run_layer(layer, x, take_rows(kw, h.shape[0], slice(r, r + 1)))
                (g_in[r : r + 1],) = torch.autograd.grad(out, x, grads[k][r : r + 1])
            grads[k] = g_in


class _FisherHooks:
    """Forward hooks on a layer's linears that hang a gradient hook on each output: the backward then adds
    fisher_diagonal(x, ∂L/∂y) for that linear."""

    def __init__(self, linears: List[Tuple[str, nn.Linear]]):
        self.sums: Dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears]

    def _hook(self, name):
        def hook(mod, args, out):
            if not out.requires_grad:  # nothing upstream needs a gradient: no sensitivity to collect here
                return
            x = args[0].detach()

            def on_grad(g):
                f = fisher_diagonal(x, g.detach())
                self.sums[name] = self.sums[name] + f if name in self.sums else f

            out.register_hook(on_grad)

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def fisher_layers(
    source, layout, ids, batch_size, device, progress, spool_dir: Optional[Path] = None
) -> Iterator[Tuple[int, Members, Dict]]:
    """(layer index, its input sets, {local linear name: F [out, in]}) for each decoder layer, last to first,
    with the layer loaded while the caller reads it (unloaded again after: the pass reads it once more). The
    spool goes to a temporary directory in `spool_dir` (the system's default when None), removed at the end
    or when the caller stops early (close the generator: contextlib.closing)."""
    from compress_export.core.progress import Progress

    final_norm(source.model, layout)  # refused before any layer runs
    states = capture_states(source, layout, ids, batch_size, device)
    hidden, kwargs = [h for h, _ in states], [kw for _, kw in states]
    del states
    n = len(layout.layers)
    with tempfile.TemporaryDirectory(prefix="compress-export-sensitivity-", dir=spool_dir) as tmp:
        check_spool_room(Path(tmp), n * sum(h.numel() * h.element_size() for h in hidden))
        bar = Progress(2 * n, "measuring sensitivity for mixed precision", enabled=progress)
        hidden, members = _forward_sweep(source, layout, hidden, kwargs, tmp, bar)
        grads = _loss_gradients(source, layout, hidden, ids)
        del hidden
        for i in reversed(range(n)):
            layer = source.load_layer(layout, i).to(device)
            try:
                hooks = _FisherHooks(layout.linears[i])
                try:
                    _backward_layer(layer, _spool_path(tmp, i), kwargs, grads, device)
                finally:
                    hooks.remove()
                _spool_path(tmp, i).unlink()
                yield i, members[i], hooks.sums
            finally:
                source.unload_layer(layout, i)
            bar.update(2 * n - i)
