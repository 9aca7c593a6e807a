"""Asymmetric calibration (modifiers/asymmetric.py): the target is the least-squares fit of the original outputs,
GPTQ on it lowers the asymmetric error, the teacher stream is the original model's, layer 0's first group (same
inputs in both streams) is untouched, and the export holds what was computed."""

import json

import pytest
import torch
from conftest import assert_written_as_computed, recorder

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.math.hessian import HessianAccumulator
from compress_export.math.sweep import gptq_quantize
from compress_export.modifiers.asymmetric import DEFAULT_ALPHA, Asymmetric, _Cross, asymmetric_target
from compress_export.modifiers.base import Modifier, PlanContext, plan_modifiers
from compress_export.passes.sequential import run_layer
from compress_export.pipeline.compress import compress
from compress_export.pipeline.config import CompressionConfig


def _inputs(n=600, d=48, noise=0.2, seed=0):
    """Correlated float inputs and a perturbed copy, as a compressed prefix gives them."""
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(n, 12, generator=g) @ torch.randn(12, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)
    return x_fp, x_fp + noise * torch.randn(n, d, generator=g)


def _stats(x_fp, x_q, chunks=3):
    H, D = HessianAccumulator(x_q.shape[1]), _Cross()
    for a, b in zip(x_fp.chunk(chunks), x_q.chunk(chunks)):
        H.add(b)
        D.add(a, b)
    return H, D


def test_target_is_the_least_squares_fit_of_the_original_outputs():
    """At α = 1 without dampening, V is the solution of min ||X_fp Wᵀ - X_q Vᵀ|| (torch.linalg.lstsq), whatever the
    chunking of the running means; at α = 0 it is W."""
    x_fp, x_q = _inputs()
    W = torch.randn(20, 48, generator=torch.Generator().manual_seed(2))
    H, D = _stats(x_fp, x_q)
    V = asymmetric_target(W, H.H, D.D, 1.0, 0.0)
    ref = torch.linalg.lstsq(x_q.double(), x_fp.double() @ W.double().T).solution.T
    assert (V.double() - ref).abs().max() < 1e-4
    assert torch.equal(asymmetric_target(W, H.H, D.D, 0.0, 0.01), W)


def test_a_singular_hessian_gets_more_dampening_not_nan():
    """Inputs with two equal columns and no dampening: H is singular, so the solve raises λ as the pass does and V
    stays finite (near W: the step is bounded by the dampening it needed)."""
    x_fp, x_q = _inputs()
    x_q[:, 7] = x_q[:, 6]
    W = torch.randn(8, 48, generator=torch.Generator().manual_seed(2))
    H, D = _stats(x_fp, x_q)
    V = asymmetric_target(W, H.H, D.D, 1.0, 0.0)
    assert torch.isfinite(V).all() and not torch.equal(V, W)


def test_gptq_on_the_target_lowers_the_asymmetric_error():
    """GPTQ W4 g16 of W, and of V at α = 0.5 and 1: the output error against the original outputs X_fp Wᵀ falls
    with α (α = 1 is the single layer's optimum; the pipeline's default is smaller, see DEFAULT_ALPHA)."""
    x_fp, x_q = _inputs(noise=0.3, seed=1)
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(2)) * 0.1
    H, D = _stats(x_fp, x_q)
    scheme = Scheme(4, 16, True, "none")
    err = []
    for alpha in (0.0, 0.5, 1.0):
        Q = gptq_quantize(asymmetric_target(W, H.H, D.D, alpha, 0.01), H.H, scheme).dequantize()
        err.append(float((x_fp @ W.T - x_q @ Q.T).pow(2).mean()))
    assert err[2] < err[1] < err[0] and err[2] < 0.8 * err[0]  # measured: 0.0472, 0.0369, 0.0302


def _plan(**kw):
    cfg = CompressionConfig(**kw)
    return Asymmetric.plan(cfg, PlanContext(scheme=cfg.to_scheme(), method=cfg.resolved_method(), model_type="llama"))


def test_plan():
    default = _plan(method="gptq")
    assert (default.alpha if default else 0.0) == DEFAULT_ALPHA
    assert _plan(method="gptq", asymmetric=0.3).alpha == 0.3
    assert _plan(method="sparsegpt", sparsity="2:4", asymmetric=0.3).alpha == 0.3
    assert _plan(method="gptq", asymmetric=0) is None
    assert _plan(method="rtn") is None and _plan(method="awq") is None  # the default applies where it can
    with pytest.raises(UserError, match="asymmetric must be an α between 0"):
        CompressionConfig(asymmetric=1.5)
    with pytest.raises(UserError, match="--asymmetric fits the targets of gptq and sparsegpt, not awq"):
        _plan(method="awq", asymmetric=0.5)
    assert _plan(method="awq", asymmetric=0) is None


class _Spy(Asymmetric):
    """Records the teacher stream: layer 0's input, then each layer's teacher output (chunk 0)."""

    seen: list = []

    def before_layer(self, ctx, index, layer, states):
        super().before_layer(ctx, index, layer, states)
        if index == 0:
            _Spy.seen.append(self._teacher_in[0].clone())

    def refine_layer(self, ctx, index, layer, results):
        changed = super().refine_layer(ctx, index, layer, results)
        _Spy.seen.append(self._teacher_in[0].clone())
        return changed


def _run(tiny_model, tiny_text, out, alpha, **kw):
    results, on_result = recorder()
    kw = {"num_samples": 8, **kw}
    cfg = CompressionConfig(dataset=str(tiny_text), seq_len=32, group_size=32, method="gptq", asymmetric=alpha, **kw)
    s = compress(tiny_model, out, cfg, progress=False, on_result=on_result)
    return s, results


# one forward per layer; chunks (the two-pass path); one sample, whose probe forward has the chunk's shape
@pytest.mark.parametrize("batch_size,samples", [(None, 8), (3, 8), (None, 1)])
def test_the_teacher_stream_is_the_original_models(tiny_model, tiny_text, tmp_path, monkeypatch, batch_size, samples):
    """Each layer's teacher outputs are the original model's hidden states (transformers' own forward from the same
    embeddings), and only layer 0's first group, whose inputs both streams share, is compressed as GPTQ does."""
    from transformers import AutoModelForCausalLM

    from compress_export.modifiers import base

    monkeypatch.setitem(base.MODIFIERS._items, "asymmetric", _Spy)
    _Spy.seen = []
    run = dict(batch_size=batch_size, num_samples=samples)
    _, plain = _run(tiny_model, tiny_text, tmp_path / "plain", 0.0, **run)
    s, asym = _run(tiny_model, tiny_text, tmp_path / "asym", 0.5, **run)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(inputs_embeds=_Spy.seen[0], output_hidden_states=True).hidden_states
    layers = model.config.num_hidden_layers
    assert len(_Spy.seen) == layers + 1
    for i in range(layers - 1):  # the last of hidden_states is after the final norm
        assert torch.allclose(_Spy.seen[i + 1], hs[i + 1], atol=1e-4), i
    # one forward: o_proj and the MLP of layer 0 already see the compressed q/k/v; in chunks each group of a layer
    # is calibrated on the uncompressed layer, so all of layer 0 sees the original inputs
    first = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if batch_size is None else ("",)
    for n in plain:
        same = torch.equal(plain[n].codes, asym[n].codes) and torch.equal(plain[n].scales, asym[n].scales)
        assert same == n.startswith(tuple("model.layers.0." + p for p in first)), n
    assert_written_as_computed(tmp_path / "asym", asym)
    extra = json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]["compress_export"]
    assert extra["asymmetric_calibration"] == {"alpha": 0.5, "linears": len(asym)}
    assert s.asymmetric.startswith(f"α 0.5, {len(asym)} linears")


class _OtherForwards(Modifier):
    """Runs every layer on the pipeline's own chunk tensors in before_layer, after asymmetric calibration armed its
    hooks (as recovery does on layer 0's inputs): the worst case for telling calibration forwards apart."""

    order = 90

    @classmethod
    def plan(cls, config, ctx):
        return cls() if config.seed == 5 else None

    @torch.no_grad()
    def before_layer(self, ctx, index, layer, states):
        for h, kw in states or ():
            run_layer(layer, h, kw)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_other_modifiers_forwards_do_not_change_the_result(tiny_model, tiny_text, tmp_path, monkeypatch, batch_size):
    from compress_export.modifiers import base

    base.MODIFIERS.names()
    monkeypatch.setitem(base.MODIFIERS._items, "other", _OtherForwards)
    monkeypatch.setattr(_OtherForwards, "name", "other", raising=False)
    _, alone = _run(tiny_model, tiny_text, tmp_path / "a", 0.5, batch_size=batch_size)
    _, beside = _run(tiny_model, tiny_text, tmp_path / "b", 0.5, batch_size=batch_size, seed=5)
    _, plain = _run(tiny_model, tiny_text, tmp_path / "p", 0.0, batch_size=batch_size, seed=5)
    for n in alone:
        assert torch.equal(alone[n].codes, beside[n].codes) and torch.equal(alone[n].scales, beside[n].scales), n
    assert any(not torch.equal(alone[n].codes, plain[n].codes) for n in alone)  # the modifier did act


def test_modifiers_run_in_their_declared_order_whatever_the_import_order():
    """Asymmetric calibration copies the layer after SmoothQuant smoothed it, and the training steps come last."""
    from compress_export.modifiers.base import MODIFIERS

    order = [cls.name for cls in sorted((c for _, c in MODIFIERS.items()), key=lambda c: c.order)]
    assert order[:4] == ["smoothquant", "asymmetric", "lowrank", "recover"]
    m = _plan(method="gptq", scheme="W8A8", lowrank_rank=4)
    cfg = CompressionConfig(method="gptq", scheme="W8A8", lowrank_rank=4)
    ctx = PlanContext(scheme=cfg.to_scheme(), method="gptq", model_type="llama")
    assert [x.name for x in plan_modifiers(cfg, ctx)] == ["smoothquant", "asymmetric", "lowrank"] and m is not None
