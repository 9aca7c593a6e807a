"""Mixed precision's loss sensitivity (pipeline/sensitivity.py): the streamed forward, head and backward sweeps
give, for every linear, the Fisher diagonal that transformers' own model and autograd give on the whole model at
once (its loss, its backward): an independent computation of the same quantity."""

import json

import pytest
import torch
from conftest import make_tiny_llama

from compress_export.core.structure import describe
from compress_export.io import model_io
from compress_export.io.source import InMemorySource, build_skeleton, open_source
from compress_export.passes.sequential import take_rows
from compress_export.pipeline.sensitivity import fisher_layers


def _reference(path, ids):
    """F[o, j] = Σ_t (∂L/∂y_to)² x_tj² per linear, from the whole model's loss (labels = ids) and autograd."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sums, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:

            def hook(mod, args, out, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1])

                def on_grad(g):
                    g2 = g.detach().reshape(-1, g.shape[-1]).pow(2)
                    sums[name] = sums.get(name, 0) + g2.t() @ x.pow(2)

                out.register_hook(on_grad)

            handles.append(mod.register_forward_hook(hook))
    model(input_ids=ids, labels=ids).loss.backward()
    return sums


@pytest.mark.parametrize(
    "tie,streamed,attn",
    [(True, True, None), (True, False, None), (False, True, None), (False, False, None), (False, True, "eager")],
)
def test_the_streamed_sweeps_give_the_whole_models_fisher_diagonal(tmp_path, tie, streamed, attn):
    """attn "eager": the layers get a [B, 1, S, S] mask, which the backward's one-sample runs must cut per sample
    (with SDPA and no padding the mask is None)."""
    path = make_tiny_llama(tmp_path / "m", tie=tie, layers=3, hidden=64, inter=128)
    if attn:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "attn_implementation": attn}))
    ids = torch.randint(3, 60, (5, 24), generator=torch.Generator().manual_seed(0))
    want = _reference(path, ids)
    if streamed:
        source = open_source(path, build_skeleton(path), model_io.tensor_index(path), True, False)
        assert source.streamed
    else:
        source = InMemorySource(path)
    layout = describe(source.model)
    got, order = {}, []
    for i, members, sums in fisher_layers(source, layout, ids, 2, torch.device("cpu"), False):  # batches 2, 2, 1
        order.append(i)
        assert sorted(n for m in members for n in m) == sorted(n for n, _ in layout.linears[i])
        assert ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] in members
        for name, f in sums.items():
            got[layout.full_name(i, name)] = f
        if streamed:  # the caller reads the layer while it is loaded; it is freed again after
            assert not any(p.is_meta for p in layout.layers[i].parameters())
    assert order == [2, 1, 0]
    assert set(got) == set(want)
    for name, f in want.items():
        torch.testing.assert_close(got[name], f, rtol=1e-4, atol=1e-9 * float(f.abs().max()), msg=name)
    if streamed:
        assert all(p.is_meta for layer in layout.layers for p in layer.parameters())


def test_a_model_without_a_known_final_norm_is_refused_naming_where_it_looked(tmp_path):
    from compress_export.core.errors import UserError

    path = make_tiny_llama(tmp_path / "m", layers=1)
    source = InMemorySource(path)
    layout = describe(source.model)
    del source.model.model.norm  # no final norm where the family says, nor anywhere generic
    with pytest.raises(UserError, match="no final norm found .*model.norm"):
        list(fisher_layers(source, layout, torch.randint(3, 60, (2, 8)), 2, torch.device("cpu"), False))


def test_the_spool_is_removed_when_done_or_stopped_early_and_a_full_disk_is_refused(tmp_path, monkeypatch):
    import collections
    import contextlib
    import shutil

    from compress_export.core.errors import UserError

    path = make_tiny_llama(tmp_path / "m", layers=3)
    source = open_source(path, build_skeleton(path), model_io.tensor_index(path), True, False)
    layout = describe(source.model)
    ids = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    spool = tmp_path / "spool"
    spool.mkdir()
    assert len(list(fisher_layers(source, layout, ids, 2, torch.device("cpu"), False, spool))) == 3
    assert not any(spool.iterdir())
    with contextlib.closing(fisher_layers(source, layout, ids, 2, torch.device("cpu"), False, spool)) as sweep:
        next(sweep)  # the last layer; two layers' inputs still spooled
        assert len(list(next(spool.iterdir()).iterdir())) == 2
    assert not any(spool.iterdir())
    assert all(p.is_meta for layer in layout.layers for p in layer.parameters())  # the yielded layer freed too
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 1000))
    with pytest.raises(UserError, match=r"spools every layer's calibration inputs beside the output.*--seq-len"):
        next(fisher_layers(source, layout, ids, 2, torch.device("cpu"), False, spool))
    assert not any(spool.iterdir())


def test_a_layers_kwargs_are_cut_per_sample_only_where_they_are_per_sample():
    """Batch 4 of sequences of 4: the mask and position ids are per sample, cache_position [S] and rotary tables
    shared by the batch are not, though cache_position's length equals the batch."""
    mask, pos = torch.randn(4, 1, 4, 4), torch.arange(16).reshape(4, 4)
    cache, rope = torch.arange(4), (torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    kw = {"attention_mask": mask, "position_ids": pos, "cache_position": cache, "position_embeddings": rope, "x": None}
    got = take_rows(kw, 4, slice(1, 2))
    assert torch.equal(got["attention_mask"], mask[1:2]) and torch.equal(got["position_ids"], pos[1:2])
    assert got["cache_position"] is cache and got["position_embeddings"][0] is rope[0] and got["x"] is None
