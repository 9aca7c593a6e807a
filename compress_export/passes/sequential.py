"""Layer-at-a-time calibration: decoder layer i sees the outputs of the already-compressed layers before it.

Only one decoder layer's statistics are alive at a time, and the hidden states of the calibration set are
replaced in place as they flow through, so memory does not grow with depth.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, layer0: nn.Module, ids: torch.Tensor, batch_size: int):
    """Run the model up to its first decoder layer; return [(hidden, kwargs)] per batch.

    The kwargs (rotary embeddings, masks, positions) are whatever this architecture passes its layers, so the
    same capture works for any model whose layers are called with (hidden_states, **kwargs).
    """
    store: List[Tuple[torch.Tensor, dict]] = []

    def pre_hook(mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.append((hidden.detach(), kwargs))
        raise _Stop

    handle = layer0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for b in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[b : b + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return store


def capture_states(source, layout, ids: torch.Tensor, batch_size: int, device) -> list:
    """Layer 0's calibration inputs [(hidden, kwargs)] per batch on `device`, the modules before the first layer
    read from `source` only for it (a streamed source frees them again)."""
    source.load_inputs(layout.layers_path)
    states = to_device(capture_layer0_inputs(source.model, layout.layers[0], ids, batch_size), device)
    source.release_inputs(layout.layers_path)
    return states


def to_device(obj, device):
    """Tensors inside nested tuples/lists/dicts (captured layer inputs and their kwargs) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if type(obj) in (tuple, list):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class InputGroups:
    """Forward hooks that group linears reading the very same input tensor and feed one accumulator per group.

    Identity (`is`) on the first batch decides the groups: q/k/v get the same normed hidden states object, so
    they share one Hessian. References are held for the batch, so no freed buffer can alias a later input.
    """

    def __init__(self, linears: List[Tuple[str, nn.Linear]], make_stats: Callable[[int], object]):
        self.make_stats = make_stats
        self.group_of: Dict[str, int] = {}
        self.members: List[List[str]] = []
        self.stats: List[object] = []
        self._seen: List[Tuple[torch.Tensor, int]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears]

    def _hook(self, name):
        def hook(mod, args, out):
            x = args[0]
            gid = self.group_of.get(name)
            if gid is None:
                gid = next((g for t, g in self._seen if t is x), None)
                if gid is None:
                    gid = len(self.members)
                    self.members.append([])
                    self.stats.append(self.make_stats(x.shape[-1]))
                    self.stats[gid].add(x.detach())
                self.group_of[name] = gid
                self.members[gid].append(name)
            elif self.members[gid][0] == name:
                self.stats[gid].add(x.detach())
            self._seen.append((x, gid))

        return hook

    def next_batch(self):
        self._seen.clear()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._seen.clear()


def probe_groups(
    layer: nn.Module, linears: List[Tuple[str, nn.Linear]], hidden: torch.Tensor, kwargs: dict
) -> List[List[str]]:
    """Which linears read the same input tensor, from one cheap forward of a single sample."""
    groups = InputGroups(linears, lambda n: NullStats())
    try:
        run_layer(layer, hidden[:1], take_rows(kwargs, hidden.shape[0], slice(0, 1)))
    finally:
        groups.remove()
    seen = set(groups.group_of)
    return groups.members + [[n] for n, _ in linears if n not in seen]


def take_rows(kwargs: dict, batch: int, rows) -> dict:
    """A decoder layer's kwargs for the samples `rows` (an index tensor or a slice): tensors of two or more
    dimensions with a leading batch dimension (masks [B, 1, S, S], position ids [B, S], rotary tables [B, S, D])
    are indexed, the rest (tables shared by the batch, None masks, and 1-D tensors: cache_position [S] is not per
    sample, even where S equals the batch) pass as they are."""

    def cut(v):
        if torch.is_tensor(v) and v.dim() > 1 and v.shape[0] == batch and batch > 1:
            return v[rows]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


class NullStats:
    """Statistics that keep nothing: InputGroups used only for which linears share an input."""

    def add(self, x):
        pass


class CompressOnFirstCall:
    """Pre-hooks that compress a group of linears the moment its leader is first called.

    With the whole calibration set in one batch, each linear is called once per layer forward: the leader's
    input is every calibration token, already flowing through the compressed linears before it. So a single
    forward per decoder layer both calibrates (true-sequentially) and propagates the compressed outputs.
    """

    def __init__(self, modules: Dict[str, nn.Linear], groups: List[List[str]], on_group):
        self._handles = []
        for names in groups:
            self._handles.append(modules[names[0]].register_forward_pre_hook(self._hook(names, on_group)))

    def _hook(self, names, on_group):
        done = []

        def hook(mod, args):
            if done:
                raise RuntimeError(f"{names[0]} was called twice in one forward; use the two-pass mode")
            done.append(True)
            on_group(names, args[0])

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
