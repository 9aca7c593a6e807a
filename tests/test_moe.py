"""Mixture-of-experts end to end on tiny random Qwen3-MoE / Qwen2-MoE (and OLMoE, DeepSeek-V3, Mixtral) models (transformers 5's fused experts):
unfused into per-expert linears (core/moe.py), every expert compressed with routing-aware calibration, experts no
token reached reported and rounded to nearest, exported as compressed-tensors and GPTQ, loaded by our loader and by
from_pretrained, streamed a layer at a time, and served by vLLM through our plugin's MoE method."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _tiny_tokenizer, assert_written_as_computed, recorder
from test_streaming import assert_same_export, tensors

from compress_export.core.moe import expert_index, unfuse_experts
from compress_export.core.scheme import Scheme
from compress_export.io.loading import load_model
from compress_export.math.quant import rtn_quantize
from compress_export.pipeline.compress import compress

EXPERTS, TOP_K, LAYERS = 8, 2, 2
MOE = dict(
    vocab_size=64,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,  # vLLM's CPU attention wants 64
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=True,
)


# what each family needs beyond MOE: Qwen2-MoE a shared expert; OLMoE its own head (vLLM's OLMoE never ties it);
# DeepSeek-V3 its own expert counts, its real router (sigmoid scores with a correction bias, which vLLM builds
# only for "noaux_tc"), MLA attention (low-rank q and kv) and no dense first layer, so that every layer has experts
EXTRA = {
    "mixtral": dict(num_local_experts=EXPERTS),  # its experts are intermediate_size wide
    "qwen2_moe": dict(shared_expert_intermediate_size=128),
    "olmoe": dict(tie_word_embeddings=False),
    "deepseek_v3": dict(
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        tie_word_embeddings=False,  # as DeepSeek-V3 (vLLM's model never ties its head)
        num_key_value_heads=2,  # MLA gives every head its own key and value
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        q_lora_rank=64,
        kv_lora_rank=512,  # + the rotary part: 576, DeepSeek-V3's own and the only one vLLM's CPU MLA decodes
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        head_dim=64,
    ),
}


def moe_config(model_type="qwen3_moe", **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**MOE, **EXTRA.get(model_type, {}), **kw})


def tiny_moe(path, model_type="qwen3_moe", seed=0, shard="50GB", **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(model_type, **kw)).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size=shard)
    _tiny_tokenizer().save_pretrained(str(path))
    return path


# how a family's checkpoints name the MoE block and an expert's linears (Mixtral's as transformers' save_pretrained
# writes them, and as vLLM's mixtral.py reads them; the others as Qwen's)
STORED = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}


def expert_linears(layers=LAYERS, experts=EXPERTS, model_type="qwen3_moe"):
    block, projections = STORED.get(model_type, ("mlp", ("gate_proj", "up_proj", "down_proj")))
    return {
        f"model.layers.{i}.{block}.experts.{e}.{p}" for i in range(layers) for e in range(experts) for p in projections
    }


IDS = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "mixtral"])
def test_unfused_experts_compute_what_transformers_fused_experts_compute(model_type, tmp_path):
    """The independent facts: transformers' own fused forward (grouped_mm over the 3-D parameters) gives the same
    logits as our per-expert linears, and the names the unfused model's parameters take are exactly the names
    transformers writes on save_pretrained (what lets a checkpoint stream a layer at a time with no renaming)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(model_type)).eval()
    fused = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert len(fused) == 2 * LAYERS, fused  # transformers 5 fuses them: the premise of this module
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        model.save_pretrained(str(tmp_path), safe_serialization=True)
        assert unfuse_experts(model) == LAYERS
        got = model(input_ids=IDS).logits
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stored = set()
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            stored |= set(s.keys())
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(model.state_dict()) - tied == stored  # a tied head is stored once
    assert expert_linears(model_type=model_type) <= {n.rpartition(".")[0] for n in stored}


@pytest.mark.parametrize(
    "fmt,method,scheme",
    [
        ("compressed-tensors", "gptq", Scheme(4, 32, True)),
        ("gptq", "gptq", Scheme(4, 64, False)),
        ("compressed-tensors", "rtn", Scheme(8, -1, True)),
    ],
)
def test_every_expert_is_compressed_exported_and_loaded(fmt, method, scheme, tmp_path, tiny_text):
    """Every expert linear of every layer is packed, the router stays dense and is named so, the files hold what
    the pass computed, our loader's logits are close to the original's, and reading a layer at a time from the
    shards gives the very export the whole model in memory gives."""
    base = tiny_moe(tmp_path / "base")
    ref, _ = load_model(base)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    results, on_result = recorder()
    kw = dict(method=method, fmt=fmt, scheme=scheme, dataset=str(tiny_text), num_samples=8, seq_len=32)
    s = compress(base, tmp_path / "out", progress=False, on_result=on_result, **kw)
    assert s.streamed and not s.fused_dense and not s.kept_dense, s
    assert expert_linears() <= set(results), sorted(expert_linears() - set(results))[:4]
    assert_written_as_computed(tmp_path / "out", results)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    dense = set(qc.get("ignore") or qc.get("modules_not_quantized") or [])
    assert {f"model.layers.{i}.mlp.gate" for i in range(LAYERS)} <= dense, dense  # the routers
    model, _ = load_model(tmp_path / "out")
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.05 if scheme.bits == 8 else 0.3), rel
    compress(base, tmp_path / "memory", progress=False, stream=False, **kw)
    assert_same_export(tmp_path / "out", tmp_path / "memory")


@pytest.mark.parametrize("method,scheme", [("gptq", Scheme(4, 32, True)), ("awq", Scheme(4, 32, False))])
def test_experts_no_token_reached_are_reported_and_rounded_to_nearest(method, scheme, tmp_path, tiny_text):
    """Two calibration tokens reach at most 2 × top-2 = 4 of the 8 experts of a layer: the others are compressed
    by round to nearest at the same scheme (the same codes rtn_quantize gives their weights), reported by name,
    and the routed ones by the pass."""
    base = tiny_moe(tmp_path / "base")
    src, _ = load_model(base)
    weights = {n: m.weight.detach() for n, m in src.named_modules() if isinstance(m, torch.nn.Linear)}
    results, on_result = recorder()
    s = compress(
        base,
        tmp_path / "out",
        method=method,
        scheme=scheme,
        dataset=str(tiny_text),
        num_samples=1,
        seq_len=2,
        progress=False,
        on_result=on_result,
    )
    assert expert_linears() <= set(results)
    per_layer = [[n for n in s.unrouted if n.startswith(f"model.layers.{i}.")] for i in range(LAYERS)]
    assert all(len(u) >= 3 * (EXPERTS - 2 * TOP_K) for u in per_layer), s.unrouted
    assert all(expert_index(n) >= 0 for n in s.unrouted)
    assert "got no calibration tokens" in "\n".join(s.lines()) and "round to nearest" in "\n".join(s.lines())
    for name in s.unrouted:
        want = rtn_quantize(weights[name].float(), scheme)
        assert torch.equal(results[name].codes, want.codes) and torch.equal(results[name].scales, want.scales), name
    routed = sorted(expert_linears() - set(s.unrouted))
    assert routed, "some experts must have been calibrated"
    w = weights[routed[0]].float()
    assert not torch.equal(results[routed[0]].codes, rtn_quantize(w, scheme).codes)  # the pass moved some codes
    assert_written_as_computed(tmp_path / "out", results)


@pytest.mark.parametrize(
    "model_type,fmt", [("olmoe", "gptq"), ("deepseek_v3", "compressed-tensors"), ("mixtral", "compressed-tensors")]
)
def test_other_moe_families_are_compressed_exported_and_loaded(model_type, fmt, tmp_path, tiny_text):
    """The other families whose experts are unfused: every expert linear and every other linear (DeepSeek's MLA
    projections and shared experts) is packed, the files hold what the pass computed, and our loader and
    from_pretrained both give logits close to the original model's (not to each other's: kernel rounding can flip
    a random router's choice of expert)."""
    from compress_export import AutoCompressedModelForCausalLM

    base = tiny_moe(tmp_path / "base", model_type)
    ref, _ = load_model(base)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    linears = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    linears -= {f"model.layers.{i}.mlp.gate" for i in range(LAYERS)}  # OLMoE's router is a Linear: kept
    assert expert_linears(model_type=model_type) <= linears
    results, on_result = recorder()
    kw = dict(method="gptq", fmt=fmt, scheme=Scheme(4, 32, False), dataset=str(tiny_text), num_samples=8, seq_len=32)
    s = compress(base, tmp_path / "out", progress=False, on_result=on_result, **kw)
    assert s.streamed and not s.fused_dense and not s.kept_dense, s
    assert set(results) == linears, sorted(linears ^ set(results))[:4]
    assert_written_as_computed(tmp_path / "out", results)
    ours, _ = load_model(tmp_path / "out")
    hf = AutoCompressedModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for model in (ours, hf):
        with torch.no_grad():
            got = model(input_ids=IDS).logits
        assert ((got - want).norm() / want.norm()).item() < 0.3


@pytest.mark.parametrize(
    "model_type,fmt", [("qwen2_moe", "compressed-tensors"), ("qwen2_moe", "gptq"), ("mixtral", "gptq")]
)
def test_from_pretrained_runs_a_moe_export(model_type, fmt, tmp_path, tiny_text):
    """The Optimum-style class (transformers' loader with our quantizer) gives our loader's logits (Mixtral: with
    transformers' block_sparse_moe → mlp rename dropped, its block keeps the checkpoint's name)."""
    from compress_export import AutoCompressedModelForCausalLM

    base = tiny_moe(tmp_path / "base", model_type)
    out = tmp_path / "out"
    compress(
        base,
        out,
        method="gptq",
        fmt=fmt,
        scheme=Scheme(4, 32, True),
        dataset=str(tiny_text),
        num_samples=8,
        seq_len=32,
        progress=False,
    )
    ours, _ = load_model(out)
    model = AutoCompressedModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        want, got = ours(input_ids=IDS).logits, model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_only_one_moe_layer_holds_weights_at_a_time(tmp_path, tiny_text, monkeypatch):
    """Streaming a deeper MoE model: when layer i is read, every other decoder layer (all its experts) is on the
    meta device, so peak memory does not grow with depth."""
    from compress_export.io import source as src_mod

    base = tiny_moe(tmp_path / "base", num_hidden_layers=6)
    seen = []
    real = src_mod.StreamedSource.load_layer

    def load_layer(self, layout, i):
        layer = real(self, layout, i)
        seen.append((i, [j for j, lay in enumerate(layout.layers) if any(not p.is_meta for p in lay.parameters())]))
        return layer

    monkeypatch.setattr(src_mod.StreamedSource, "load_layer", load_layer)
    s = compress(
        base,
        tmp_path / "o",
        method="gptq",
        scheme=Scheme(4, 32, True),
        dataset=str(tiny_text),
        num_samples=4,
        seq_len=32,
        progress=False,
    )
    assert s.streamed and seen == [(i, [i]) for i in range(6)]


def _export_memory_mb(src, out, stream: bool) -> tuple:
    """An export's memory in a fresh process: (peak, [resident set just after each streamed layer is read]).
    Peak is VmHWM, the high-water mark of the process's own address space (ru_maxrss would carry over the forking
    pytest process's, which Linux keeps across exec); the per-layer figures are VmRSS, empty when not streamed."""
    code = (
        "import re; from compress_export.pipeline.compress import compress; "
        "from compress_export.core.scheme import Scheme; from compress_export.io import source as S; "
        "mb = lambda k: int(re.search(k + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024; "
        "seen = []; real = S.StreamedSource.load_layer; "
        "S.StreamedSource.load_layer = lambda self, lay, i: (real(self, lay, i), seen.append(mb('VmRSS')))[0]; "
        f"compress({str(src)!r}, {str(out)!r}, method='rtn', scheme=Scheme(4, 32, True), progress=False, "
        f"stream={stream}); "
        "print(mb('VmHWM'), *seen)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    peak, *layers = map(float, r.stdout.split("\n")[-2].split())
    return peak, layers


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux's /proc")
def test_streaming_peak_memory_stays_flat_on_a_deeper_moe_model(tmp_path):
    """A streamed export of an 8-layer MoE model (32 experts a layer, ~100 MB of bf16 weights), sharded as hub
    checkpoints are (20 MB here), holds the same resident set whenever it reads a layer, and its peak is within the
    issue's 15% of a 2-layer model's; the whole 8-layer model in memory costs at least half its size more, so the
    check can fail.

    Why the per-layer figure: glibc kept what each layer freed (the heap's dynamic mmap threshold rose after the
    first large frees, and the arenas of torch's threads kept their free pages), so the resident set at each layer
    rose with depth (711 → 838 MB over 8 layers; peak ratio 1.11-1.16 against 2 layers). Now the threshold is fixed
    (hardware.fix_mmap_threshold) and the heap trimmed before each layer (hardware.release_free_heap): 737-741 MB
    at every layer. The peak within a layer still varies from run to run by up to ~50 MB (where the allocator
    places a layer's packing temporaries), the same at any depth: hence the looser bound on the peak ratio."""
    big = dict(hidden_size=256, moe_intermediate_size=256, num_experts=32, intermediate_size=512)
    small, deep = (tiny_moe(tmp_path / f"m{n}", num_hidden_layers=n, shard="20MB", **big) for n in (2, 8))
    size_mb = sum(f.stat().st_size for f in deep.glob("*.safetensors")) / 1e6
    rss_small, _ = _export_memory_mb(small, tmp_path / "o2", True)
    rss_deep, at_layer = _export_memory_mb(deep, tmp_path / "o8", True)
    rss_whole, _ = _export_memory_mb(deep, tmp_path / "o8m", False)
    print(
        f"MoE streaming: {size_mb:.0f} MB model; peak RSS 2 layers {rss_small:.0f} MB, 8 layers {rss_deep:.0f} MB "
        f"(ratio {rss_deep / rss_small:.3f}), 8 layers in memory {rss_whole:.0f} MB; resident at each layer "
        f"{' '.join(f'{r:.0f}' for r in at_layer)} MB"
    )
    assert len(at_layer) == 8
    assert max(at_layer[1:]) - at_layer[1] <= 0.1 * size_mb  # one layer is ~12 MB: no layer's memory is kept
    assert rss_deep / rss_small <= 1.15
    assert rss_whole - rss_deep > 0.5 * size_mb


def test_an_export_that_stores_its_experts_fused_still_loads(tmp_path, tiny_text, monkeypatch):
    """Exports written before experts were unfused hold `mlp.experts.gate_up_proj` (dense, listed as unquantized):
    our loader and from_pretrained keep the fused modules for them, and their logits are the original's."""
    from compress_export import AutoCompressedModelForCausalLM
    from compress_export.core import moe

    base = tiny_moe(tmp_path / "base")
    ref, _ = load_model(base)
    with monkeypatch.context() as m:
        m.setattr(moe, "EXPERT_NAMES", {})  # as compress-export wrote MoE exports before
        s = compress(base, tmp_path / "old", method="rtn", scheme=Scheme(8, -1, True), progress=False)
    assert s.fused_dense and "model.layers.0.mlp.experts.gate_up_proj" in tensors(tmp_path / "old")
    ours, _ = load_model(tmp_path / "old")
    theirs = AutoCompressedModelForCausalLM.from_pretrained(tmp_path / "old", dtype=torch.float32)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        for model in (ours, theirs):
            got = model(input_ids=IDS).logits
            assert ((got - want).norm() / want.norm()).item() < 0.05


def test_the_vllm_route_sees_the_experts_shapes():
    from compress_export.integrations.vllm_route import has_experts, layer_shapes

    cfg = moe_config("qwen2_moe", moe_intermediate_size=96, shared_expert_intermediate_size=160)
    shapes = layer_shapes(cfg)
    assert {(128, 96), (96, 128), (128, 160), (160, 128)} <= set(shapes), shapes
    assert has_experts(cfg) and has_experts({"num_local_experts": 8}) and not has_experts({"hidden_size": 64})


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"])
def test_awq_balances_each_expert_and_beats_round_to_nearest(model_type, tmp_path, tiny_text):
    """AWQ's MoE mappings (attention, and each expert's up → down): folding random scales through every expanded
    mapping leaves the unquantized logits unchanged (the independent fact that they are valid), and the AWQ
    export of every expert is closer to the original than RTN at the same scheme."""
    from compress_export.core.structure import AWQ_MAPPINGS, describe
    from compress_export.math.scaling import fold_scale
    from compress_export.passes.awq_pass import _per_expert

    base = tiny_moe(tmp_path / "base", model_type, seed=5)
    ref, tok = load_model(base)
    ids = tok(tiny_text.read_text(), return_tensors="pt")["input_ids"][:, :128]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        folded, _ = load_model(base)
        n = 0
        for layer in describe(folded).layers:
            mods = dict(layer.named_modules())
            for m in _per_expert(AWQ_MAPPINGS[model_type], mods):
                if m.optional and any(n not in mods for n in (m.smooth, *m.balance)):
                    continue
                bal = [mods[b] for b in m.balance]
                if all(b.in_features == mods[m.smooth].weight.shape[0] for b in bal):
                    fold_scale(mods[m.smooth], bal, torch.rand(bal[0].in_features, generator=g) + 0.5)
                    n += 1
        assert n >= LAYERS * (EXPERTS + 1), n  # every expert's pair, at least
        torch.testing.assert_close(folded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    errs = {}
    for method in ("rtn", "awq"):
        s = compress(
            base,
            tmp_path / method,
            method=method,
            fmt="awq",
            scheme=Scheme(4, 32, False),
            dataset=str(tiny_text),
            num_samples=8,
            seq_len=64,
            progress=False,
        )
        assert s.streamed and not s.fused_dense and not s.kept_dense, s
        model, _ = load_model(tmp_path / method)
        with torch.no_grad():
            errs[method] = (model(input_ids=ids).logits - want).pow(2).mean().item()
    assert errs["awq"] < errs["rtn"], errs


def test_tensor_parallel_check_refuses_act_order_experts(tmp_path, tiny_text):
    """`check --tensor-parallel` says what serving would refuse: our MoE method shards experts only with
    contiguous groups, so an act-order MoE export cannot shard 2 ways, while the same export without act-order can."""
    from compress_export.integrations.tp_plan import plan

    base = tiny_moe(tmp_path / "base")
    for act_order in ("group", "none"):
        scheme = Scheme(4, 32, True, act_order=act_order)
        kw = dict(method="gptq", fmt="gptq", dataset=str(tiny_text), num_samples=4, seq_len=32, progress=False)
        compress(base, tmp_path / act_order, scheme=scheme, **kw)
        res = plan(tmp_path / act_order, sizes=(1, 2))
        assert res[1]["ok"]
        assert res[2]["ok"] == (act_order == "none"), res[2]
        assert any("MoE experts: act-order" in why for why in res[2]["problems"]) == (act_order == "group")
