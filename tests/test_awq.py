"""AWQ: the scale search and fold as math, the clip search against min-max, and the pass end to end."""

import json

import pytest
import torch
from conftest import assert_written_as_computed, recorder

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.io.loading import load_model
from compress_export.math.quant import group_params, weighted_group_params
from compress_export.math.scaling import fold_scale, quadratic_error, rtn_dequant, search_scale
from compress_export.pipeline.compress import compress


def outlier_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, :4] *= 20  # a few salient channels, as real LLM activations have
    return X


def test_scale_search_beats_no_scaling_and_the_objective_is_the_output_error():
    X = outlier_inputs()
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    H = 2 * X.T @ X / X.shape[0]
    scheme = Scheme(4, 32, False)
    s, loss, base = search_scale(W, H, X.abs().mean(0), scheme)
    assert loss < 0.8 * base  # salient channels protected
    assert s[:4].mean() > s[4:].mean()
    # the Hessian form equals the output error over the actual tokens
    D = W - rtn_dequant(W * s, scheme) / s
    direct = 2 * (X @ D.T).pow(2).sum() / X.shape[0]
    assert abs(quadratic_error(D, H) - float(direct)) < 1e-3 * float(direct)


@pytest.mark.parametrize("smooth_kind", ["norm", "linear"])
def test_fold_keeps_the_function(smooth_kind):
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    if smooth_kind == "norm":
        smooth = torch.nn.LayerNorm(64)
        smooth.weight.data = torch.rand(64) + 0.5
    else:
        smooth = torch.nn.Linear(32, 64, bias=True)
        x = torch.randn(8, 32)
    bal = [torch.nn.Linear(64, 16), torch.nn.Linear(64, 8)]
    before = [b(smooth(x)) for b in bal]
    fold_scale(smooth, bal, torch.rand(64) + 0.2)
    for b, y in zip(bal, before):
        assert torch.allclose(b(smooth(x)), y, atol=1e-5)


def test_weighted_clip_search_never_worse_than_min_max():
    X = outlier_inputs(seed=2)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    W[:, 7] = 1.0  # an outlier weight column widens its group's range
    for sym in (True, False):
        s, z = weighted_group_params(W, H, 4, sym, 32, 1.0 - torch.arange(20) * 0.025)
        s0, z0 = group_params(W, 4, sym, 32, search=False)
        g = torch.arange(64) // 32

        def err(s, z):
            S, Z = s[:, g], z[:, g].float()
            return quadratic_error(W - (torch.clamp(torch.round(W / S) + Z, 0, 15) - Z) * S, H)

        assert err(s, z) <= err(s0, z0) + 1e-9


def test_clip_search_skips_query_and_key_rows():
    """In a fused q/k/v group the q and k rows keep their min-max ranges (the reference's choice) and only v's
    rows are clipped: the q/k scales are (max − min) / 15 of each group (in fp16), v's are the weighted search's."""
    from compress_export.math.hessian import HessianAccumulator
    from compress_export.passes.awq_pass import CLIP_RATIOS, AWQPass
    from compress_export.passes.base import LinearGroup, PassOptions

    X = outlier_inputs(seed=4)
    acc = HessianAccumulator(64)
    acc.add(X)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, 64, generator=g) * 0.05 for n in (16, 8, 8))
    for w in (q, k, v):
        w[:, 7] = 1.0  # an outlier column: clipping its group pays off
    res = AWQPass(Scheme(4, 32, False), PassOptions()).compress_group(
        [q, k, v], acc, LinearGroup("model.layers.0.", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    )
    for w, r in zip((q, k), res[:2]):
        wg = w.reshape(w.shape[0], 2, 32)
        hand = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15
        assert torch.equal(r.scales, hand.half().float())  # scales are stored fp16-exact
    clipped, _ = weighted_group_params(v, acc.H, 4, False, 32, CLIP_RATIOS)
    assert torch.equal(res[2].scales, clipped)
    assert not torch.equal(clipped, group_params(v, 4, False, 32, search=False)[0])  # v really was clipped


def run(model, text, out, **kw):
    return compress(model, out, dataset=str(text), num_samples=8, seq_len=32, progress=False, **kw)


@pytest.mark.parametrize("fmt", ["awq", "gptq", "compressed-tensors"])
def test_awq_pass_into_every_format(tiny_model, tiny_text, tmp_path, fmt):
    results, on_result = recorder()
    s = run(
        tiny_model,
        tiny_text,
        tmp_path / "out",
        method="awq",
        fmt=fmt,
        scheme=Scheme(4, 32, False, "none"),
        on_result=on_result,
    )
    assert s.linears == 14 and s.method == "awq"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == fmt
    assert_written_as_computed(tmp_path / "out", results)
    model, _ = load_model(tmp_path / "out")
    for name, qw in results.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())


def test_awq_is_closer_than_rtn_and_defaults_asymmetric(tmp_path, tiny_text):
    from conftest import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "mha", kv_heads=4, seed=5)  # MHA: the v_proj → o_proj mapping applies
    ref, tok = load_model(model_dir)
    ids = tok(tiny_text.read_text(), return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        base = ref(input_ids=ids).logits
    errs = {}
    for m in ("rtn", "awq"):
        run(model_dir, tiny_text, tmp_path / m, method=m, fmt="awq", scheme=Scheme(4, 32, False, "none"))
        model, _ = load_model(tmp_path / m)
        with torch.no_grad():
            errs[m] = (model(input_ids=ids).logits - base).pow(2).mean().item()
    assert errs["awq"] < errs["rtn"]
    s = run(model_dir, tiny_text, tmp_path / "default", method="awq", fmt="awq")
    assert s.scheme["symmetric"] is False


def test_awq_refuses_architectures_without_mappings(tmp_path, tiny_text):
    from conftest import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "olmo", model_type="olmo")
    with pytest.raises(
        UserError,
        match="no scale mappings for model_type 'olmo'.*llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe",
    ):
        run(model_dir, tiny_text, tmp_path / "out", method="awq", fmt="awq")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_awq_mappings_fit_the_other_supported_families(tmp_path, tiny_text, model_type):
    """For each family with mappings: folding scales through every mapping (random positive scales, as AWQ folds
    its searched ones) leaves the unquantized model's logits unchanged, and the AWQ export is closer to the
    original than RTN with the same scheme."""
    from conftest import make_tiny_llama

    from compress_export.core.structure import AWQ_MAPPINGS, describe

    model_dir = make_tiny_llama(tmp_path / model_type, model_type=model_type, kv_heads=4, seed=5)
    ref, tok = load_model(model_dir)
    ids = tok(tiny_text.read_text(), return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        base = ref(input_ids=ids).logits
        folded, _ = load_model(model_dir)
        g = torch.Generator().manual_seed(3)
        for layer in describe(folded).layers:
            mods = dict(layer.named_modules())
            for m in AWQ_MAPPINGS[model_type]:
                bal = [mods[b] for b in m.balance]
                if all(b.in_features == mods[m.smooth].weight.shape[0] for b in bal):
                    fold_scale(mods[m.smooth], bal, torch.rand(bal[0].in_features, generator=g) + 0.5)
        assert torch.allclose(folded(input_ids=ids).logits, base, atol=1e-4)
    errs = {}
    for method in ("rtn", "awq"):
        s = run(model_dir, tiny_text, tmp_path / method, method=method, fmt="awq", scheme=Scheme(4, 32, False))
        assert s.linears == 14
        model, _ = load_model(tmp_path / method)
        with torch.no_grad():
            errs[method] = (model(input_ids=ids).logits - base).pow(2).mean().item()
    assert errs["awq"] < errs["rtn"], errs


def test_block_score_picks_the_scale_that_minimises_the_blocks_own_output_error(tmp_path):
    """awq_score "block": the folded scale of q/k/v is the grid point whose quantized q/k/v change the
    attention block's output least, recomputed here by hand on the same recorded inputs."""
    from conftest import make_tiny_llama

    from compress_export.math.scaling import candidate_scales, scaled_dequant
    from compress_export.passes import PassOptions
    from compress_export.passes.awq_pass import AWQPass
    from compress_export.passes.sequential import InputGroups, run_layer

    path = make_tiny_llama(tmp_path / "m", layers=1)
    model = load_model(path)[0]
    layer = model.model.layers[0]
    scheme = Scheme(4, 32, False)
    p = AWQPass(scheme, PassOptions(awq_score="block"))
    p.check_layout(None, "llama")
    calls = []
    attn = layer.self_attn
    h = attn.register_forward_hook(lambda m, a, kw, out: calls.append((a, dict(kw), out[0].detach())), with_kwargs=True)
    groups = InputGroups([(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)], p.make_stats)
    observers = p.observe_layer(layer)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    emb = model.model.embed_tokens(ids)
    pos = torch.arange(32)[None].expand(4, -1)
    kw = {"position_embeddings": model.model.rotary_emb(emb, pos), "attention_mask": None, "position_ids": pos}
    with torch.no_grad():
        run_layer(layer, emb, kw)
    h.remove()
    groups.remove()
    for o in observers:
        o.remove()
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    W = torch.cat([m.weight.detach().float() for m in qkv])
    norm_before = layer.input_layernorm.weight.detach().clone()
    stats = groups.stats[groups.group_of["self_attn.q_proj"]]
    cands = candidate_scales(stats.absmean)
    errors = []
    with torch.no_grad():
        for s in cands:  # by hand: swap the weights in, run attention on the recorded call, put them back
            eff = scaled_dequant(W, s, scheme).split([m.weight.shape[0] for m in qkv])
            saved = [m.weight.data for m in qkv]
            for m, w in zip(qkv, eff):
                m.weight.data = w
            errors.append(sum(float((attn(*a, **k)[0] - ref).pow(2).sum()) for a, k, ref in calls))
            for m, w in zip(qkv, saved):
                m.weight.data = w
        p.prepare_layer(layer, groups.members, groups.stats, "model.layers.0.")
    chosen = norm_before / layer.input_layernorm.weight.detach()  # the fold divided the norm by s
    k = min(range(len(errors)), key=errors.__getitem__)
    assert max(errors) > 1.01 * min(errors)  # the grid points differ, so picking the right one means something
    torch.testing.assert_close(chosen, cands[k], rtol=1e-5, atol=1e-6)
