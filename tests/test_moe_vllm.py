"""MoE exports in vLLM: served through our plugin's MoE method (offline, over HTTP, on two tensor-parallel workers,
2:4 experts, other families), its expert shards, and its refusals. The tiny models and helpers: test_moe.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import have_vllm
from test_moe import EXPERTS, LAYERS, tiny_moe

from compress_export.core.scheme import Scheme
from compress_export.io.loading import load_model
from compress_export.pipeline.compress import compress


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
@pytest.mark.parametrize(
    "fmt,method,scheme",
    [
        ("compressed-tensors", "gptq", Scheme(4, 64, True)),
        ("gptq", "gptq", Scheme(4, 32, False)),
        ("gptq", "gptq", Scheme(4, 32, True, act_order="group")),
        ("awq", "awq", Scheme(4, 32, False)),
        ("sparse24", "sparsegpt", None),  # 2:4 experts: our cpu-sparse24 kernel
        ("compressed-tensors", "sparsegpt", Scheme(4, 32, True)),  # 2:4 + W4 experts (pruned codes at the zero)
    ],
)
def test_vllm_serves_a_moe_export_through_our_moe_method(fmt, method, scheme, tmp_path, tiny_text):
    """vLLM (CPU) loads the MoE export, our plugin claims its MoE layers (vLLM's CPU 4-bit MoE kernel needs AMX,
    bf16 and a group size other than 32, and crashed where it ran; vLLM has no 2:4 kernel at all), and its
    log-probabilities equal our loader's."""
    from test_vllm import vllm_matches_our_loader

    base = tiny_moe(tmp_path / "base")
    out = tmp_path / "out"
    compress(
        base,
        out,
        method=method,
        fmt=fmt,
        scheme=scheme,
        sparsity="2:4" if method == "sparsegpt" else None,
        dataset=str(tiny_text),
        num_samples=8,
        seq_len=32,
        progress=False,
    )
    res = vllm_matches_our_loader(out, tmp_path, tiny_text)
    # every quantized layer runs on a kernel of ours: attention's qkv and o, and each layer's experts (our MoE method)
    assert sum(res["kernels"].values()) == 3 * LAYERS, res["kernels"]
    assert all(k.startswith("compress_export:") for k in res["kernels"]), res["kernels"]


@pytest.mark.vllm
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
def test_tensor_parallel_expert_shards_sum_to_the_whole_moe_layer():
    """Our MoE method under tensor parallelism (tests/vllm_moe_tp_shards.py): each rank loads its slice of every
    expert from the full checkpoint tensors (gate/up by outputs, down by inputs, down's groups renumbered), and
    the ranks' outputs, which vLLM all-reduces, sum to the MoE layer computed from the results before packing."""
    from test_vllm import read_result

    here = Path(__file__).with_name("vllm_moe_tp_shards.py")
    r = subprocess.run([sys.executable, str(here)], capture_output=True, text=True, timeout=600)
    res = read_result(r.stdout)
    assert res and len(res) == 8, r.stderr[-3000:]
    for case, got in res.items():
        if case.endswith("-group"):
            assert "act-order" in got.get("error", ""), (case, got)
        elif "-w3" in case:
            assert "straddle two ranks" in got.get("error", ""), (case, got)
        else:
            assert "error" not in got and got["max_err"] < 1e-4 * max(1.0, got["scale"]), (case, got)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
def test_serve_answers_the_openai_client_on_a_mixtral_export(tmp_path, tiny_text):
    """`compress-export serve` on a MoE export (Mixtral's names, our MoE method) over HTTP with the official
    client: the greedy completion, whole and streamed, is the one our loader generates, with its log-probabilities
    within 1e-3."""
    import openai
    from transformers import AutoTokenizer

    from compress_export.integrations.vllm_serve import Server

    base, out = tiny_moe(tmp_path / "base", "mixtral"), tmp_path / "out"
    kw = dict(method="gptq", fmt="compressed-tensors", scheme=Scheme(4, 32, True), dataset=str(tiny_text))
    compress(base, out, num_samples=8, seq_len=32, progress=False, **kw)
    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tiny_text.read_text()[:80]
    model, _ = load_model(out)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0]
        logp = model(input_ids=full[None]).logits[0, ids.shape[1] - 1 : -1].log_softmax(-1)
    logp = logp.gather(1, full[ids.shape[1] :, None])[:, 0]  # our loader's log-probability of each new token
    # the text the new tokens add after the prompt's (a first token's leading space included, as vLLM detokenizes)
    want = tok.decode(full, skip_special_tokens=True)[len(tok.decode(ids[0], skip_special_tokens=True)) :]
    with Server(out, tmp_path / "serve.log", name="moe", extra=["--dtype", "float32"]) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=300)
        ask = dict(model="moe", prompt=prompt, max_tokens=8, temperature=0, extra_body={"min_tokens": 8})
        r = client.completions.create(**ask, logprobs=1)
        pieces = list(client.completions.create(**ask, stream=True))
    log = (tmp_path / "serve.log").read_text()
    assert "quantization=compress_export" in log, log[-3000:]  # our plugin claimed the export
    for i in range(LAYERS):  # and every MoE layer, under its checkpoint name, runs on our MoE method
        assert f"model.layers.{i}.block_sparse_moe.experts runs {EXPERTS} experts on" in log, log[-3000:]
    assert r.choices[0].text == want, (r.choices[0].text, want)
    torch.testing.assert_close(torch.tensor(r.choices[0].logprobs.token_logprobs), logp, rtol=0, atol=1e-3)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
def test_vllm_serves_a_moe_export_on_two_tensor_parallel_workers(tmp_path, tiny_text):
    """vLLM's CPU engine with the MoE export split over 2 workers: every expert sharded by our MoE method, the
    partial outputs all-reduced by vLLM, log-probabilities equal to our loader's."""
    from test_vllm import FP32, vllm_check
    from transformers import AutoTokenizer

    from compress_export.integrations.conformance import compare_top1

    base, out = tiny_moe(tmp_path / "base"), tmp_path / "out"
    kw = dict(method="gptq", fmt="gptq", scheme=Scheme(4, 32, False), dataset=str(tiny_text), num_samples=8)
    compress(base, out, seq_len=32, progress=False, **kw)
    ids = AutoTokenizer.from_pretrained(str(out))(tiny_text.read_text())["input_ids"][:96]
    res = vllm_check(out, tmp_path, ids, args=(*FP32, "--tensor-parallel-size", "2"))
    assert res["quantization"] == "compress_export" and sum(res["kernels"].values()) == 3 * LAYERS, res
    conf = compare_top1(out, ids, res)
    assert conf["max_abs_dlogprob"] < 1e-3 and conf["top1_agreement"] >= 0.99, conf


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
@pytest.mark.parametrize("model_type,quantized", [("olmoe", 3), ("deepseek_v3", 7)])
def test_vllm_serves_other_moe_families_exports(model_type, quantized, tmp_path, tiny_text):
    """vLLM's own OLMoE and DeepSeek-V3 models load the GPTQ export and run every quantized layer on our kernels
    (per decoder layer, OLMoE: qkv, o and the experts; DeepSeek: the fused q_a/kv_a, q_b, kv_b, o, the experts and
    the shared expert's gate_up and down), with our loader's log-probabilities (Mixtral's: the serve test above). vLLM's DeepSeek-V3 is not
    transformers' to 1e-3 even unquantized (its MLA attention and router differ by a few hundredths of a log-
    probability here, on the CPU backend in float32): its bound is twice what vLLM's unquantized model misses by."""
    from test_vllm import FP32, vllm_check
    from transformers import AutoTokenizer

    from compress_export.integrations.conformance import compare_top1

    base, out = tiny_moe(tmp_path / "base", model_type), tmp_path / "out"
    compress(
        base,
        out,
        method="gptq",
        fmt="gptq",
        scheme=Scheme(4, 32, False),
        dataset=str(tiny_text),
        num_samples=8,
        seq_len=32,
        progress=False,
    )
    ids = AutoTokenizer.from_pretrained(str(out))(tiny_text.read_text())["input_ids"][:96]
    res = vllm_check(out, tmp_path, ids, args=FP32)
    assert res["quantization"] == "compress_export", res
    assert sum(res["kernels"].values()) == quantized * LAYERS, res["kernels"]
    assert all(k.startswith("compress_export:") for k in res["kernels"]), res["kernels"]
    bound = 1e-3
    if model_type == "deepseek_v3":
        unquantized = compare_top1(base, ids, vllm_check(base, tmp_path, ids, args=FP32))
        bound = max(bound, 2 * unquantized["max_abs_dlogprob"])
    conf = compare_top1(out, ids, res)
    assert conf["max_abs_dlogprob"] < bound and conf["top1_agreement"] >= 0.9, (conf, bound)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
def test_vllm_refuses_act_order_experts_whose_g_idx_the_checkpoint_lacks(tmp_path, tiny_text):
    """An act-order GPTQ checkpoint's experts read their groups through g_idx; one without those tensors (from a
    tool that drops them) would otherwise run every expert on contiguous groups, wrong numbers with no error.
    vLLM's load stops, naming the layer. The attention linears keep theirs, so the refusal can only come from the
    experts' check."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    compress(
        tiny_moe(tmp_path / "base"),
        out,
        method="gptq",
        fmt="gptq",
        scheme=Scheme(4, 32, True, act_order="group"),
        dataset=str(tiny_text),
        num_samples=8,
        seq_len=32,
        progress=False,
    )
    dropped = 0
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        kept = {n: t for n, t in tensors.items() if not (".experts." in n and n.endswith(".g_idx"))}
        dropped += len(tensors) - len(kept)
        save_file(kept, str(f), metadata={"format": "pt"})
    assert dropped == LAYERS * EXPERTS * 3
    # as another tool's checkpoint (our own exports are checked in full before vLLM reads them, which names the
    # missing tensors first): the MoE method's own check is what stops this one
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["quantizer"] = ["gptqmodel:4.0.0"]
    (out / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "compress_export.integrations.vllm_check", str(out), "--dtype", "float32"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode != 0
    assert "act-order experts lack their g_idx tensors" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
