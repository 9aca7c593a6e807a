"""Real vLLM (CPU backend here) serving our exports through the plugin, offline and over HTTP on 127.0.0.1.

Each run is a subprocess: vLLM spawns engine processes, and a crash must fail the test, not the session.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import have_vllm

from compress_export.core.scheme import Scheme
from compress_export.integrations.vllm_check import read_result
from compress_export.kernels.cpu_wna16 import extension

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")]


# Conformance runs compare vLLM's numbers with our fp32 loader's, so they pin float32 on every CPU kind (the
# default elsewhere is the machine's fastest dtype, bf16 on AVX-512 bf16 CPUs).
FP32 = ("--dtype", "float32")


def vllm_check(model_dir, tmp_path, score_ids=None, env=None, args=()) -> dict:
    import os

    cmd = [sys.executable, "-m", "compress_export.integrations.vllm_check", str(model_dir), *args]
    if score_ids:
        (tmp_path / "ids.json").write_text(json.dumps(score_ids))
        cmd += ["--score-ids", str(tmp_path / "ids.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    res = read_result(r.stdout)
    assert r.returncode == 0 and res is not None, r.stdout[-3000:] + r.stderr[-5000:]
    return res


@pytest.mark.parametrize("export", ["smollm2_w4", "smollm2_awq", "smollm2_ct"])
def test_offline_generation_and_logits_agree_with_our_loader(export, request, eval_txt, tmp_path):
    """Every format's SmolLM2 export in vLLM through the plugin: greedy "Paris", and on the first eval window
    vLLM's top-1 next token agrees with our loader's at ≥ 99% of positions."""
    from compress_export.integrations.conformance import compare_top1, first_window_ids

    model_dir = request.getfixturevalue(export)
    ids = first_window_ids(model_dir, eval_txt)
    res = vllm_check(model_dir, tmp_path, ids, args=FP32)
    assert res["quantization"] == "compress_export"
    assert "Paris" in res["text"], res
    if extension() is not None:  # the fast kernel runs every quantized linear (q/k/v and gate/up fused by vLLM)
        assert res["kernels"] == {"compress_export:cpu-wna16": 4 * 30}, res["kernels"]
    conf = compare_top1(model_dir, ids, res)
    print(export, conf)  # reported: positions, top-1 agreement, max |Δ log p|
    assert conf["positions"] == len(ids) - 1 and conf["top1_agreement"] >= 0.99, conf
    # the Optimum-style class (transformers' loader, our kernels) against vLLM directly, on the same window
    import torch

    from compress_export import AutoCompressedModelForCausalLM

    model = AutoCompressedModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        top = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1)
    agree = (top == torch.tensor(res["top1"])).float().mean().item()
    assert agree >= 0.99, agree


def test_tensor_parallel_matches_one_worker_on_smollm2(smollm2_w4, eval_txt, tmp_path):
    """vLLM's CPU engine with the export sharded over 3 workers against 1: the same greedy text, and the same
    perplexity of the first eval window within 0.5%. SmolLM2 has 9 query and 3 KV heads, so 3 is the one split
    below 9 that vLLM accepts (`check --tensor-parallel` says why not 2). Its 3 workers share this machine's cores
    (the launcher's thread binding); the row shards of o_proj and down_proj hold whole groups of 64."""
    import math

    from compress_export.integrations.conformance import first_window_ids

    ids = first_window_ids(smollm2_w4, eval_txt)
    one = vllm_check(smollm2_w4, tmp_path, ids, args=FP32)
    three = vllm_check(smollm2_w4, tmp_path, ids, args=(*FP32, "--tensor-parallel-size", "3"))
    assert three["quantization"] == "compress_export"
    assert three["text"] == one["text"], (one["text"], three["text"])
    ppl = [math.exp(-sum(r["token_logprob"]) / len(r["token_logprob"])) for r in (one, three)]
    print("tp=1 / tp=3 perplexity of the first window:", ppl)
    assert abs(ppl[1] - ppl[0]) <= 0.005 * ppl[0], ppl


def test_int8_prefill_keeps_smollm2s_perplexity_in_vllm(smollm2_w4, eval_txt, tmp_path, int8_prefill):
    """The default W4A8 prefill (activations rounded to int8 per token for prompts of ≥ 8 rows) in vLLM on SmolLM2's
    GPTQ W4 export: the first eval window's perplexity within 2% of the exact float prefill's (benchmarks measure
    +0.4% over 16 windows), and greedy decoding still says "Paris"."""
    import math

    from compress_export.integrations.conformance import first_window_ids

    ids = first_window_ids(smollm2_w4, eval_txt)
    int8 = vllm_check(smollm2_w4, tmp_path, ids, args=FP32)
    exact = vllm_check(smollm2_w4, tmp_path, ids, env={"COMPRESS_EXPORT_PREFILL": "float"}, args=FP32)
    ppl = [math.exp(-sum(r["token_logprob"]) / len(r["token_logprob"])) for r in (exact, int8)]
    print("float / int8 prefill perplexity of the first window:", ppl)
    assert abs(ppl[1] - ppl[0]) <= 0.02 * ppl[0], ppl
    if extension() is not None:  # the int8 path ran (without the extension both are torch's float path)
        assert ppl[0] != ppl[1], ppl
    assert "Paris" in int8["text"], int8


TINY_EXPORTS = [
    ("gptq", "gptq", Scheme(4, 32, True, "static")),
    ("awq", "awq", Scheme(4, 32, False)),
    ("compressed-tensors", "gptq", Scheme(4, 32, False, "group")),
    ("sparse24", "sparsegpt", None),
    ("gptq-w3", "gptq", Scheme(3, 32, False, "group")),
]


@pytest.mark.parametrize("fmt,method,scheme", TINY_EXPORTS, ids=[t[0] for t in TINY_EXPORTS])
def test_tiny_exports_in_vllm_match_our_loader(fmt, method, scheme, tiny_text, tmp_path):
    """The tiny random Llama (head size 64, as vLLM's CPU attention wants) in every format: vLLM's log-probabilities
    of its top-1 tokens equal our loader's (random weights give near-uniform logits, so the gap, not the top-1
    agreement, is the meaningful check here)."""
    from conftest import make_tiny_llama

    from compress_export.pipeline.compress import compress

    model_dir = make_tiny_llama(tmp_path / "tiny", hidden=128, inter=256, heads=2, kv_heads=1, max_pos=2048)
    out = tmp_path / fmt
    fmt = fmt.split("-w")[0]
    compress(
        model_dir,
        out,
        method=method,
        fmt=fmt,
        scheme=scheme,
        dataset=str(tiny_text),
        num_samples=8,
        seq_len=32,
        progress=False,
        sparsity="2:4" if fmt == "sparse24" else None,
    )
    vllm_matches_our_loader(out, tmp_path, tiny_text)


def vllm_matches_our_loader(out, tmp_path, text) -> dict:
    """vLLM through our plugin, float32, on the first 96 tokens of `text`: its log-probabilities of its top-1
    tokens equal our loader's within 1e-3. Returns vLLM's result."""
    from transformers import AutoTokenizer

    from compress_export.integrations.conformance import compare_top1

    ids = AutoTokenizer.from_pretrained(str(out))(text.read_text())["input_ids"][:96]
    res = vllm_check(out, tmp_path, ids, args=FP32)
    assert res["quantization"] == "compress_export", res
    conf = compare_top1(out, ids, res)
    print(out.name, conf, res.get("kernels"))
    assert conf["max_abs_dlogprob"] < 1e-3, conf
    return res


def _tiny_vllm_model(tmp_path):
    """The tiny random Llama in a shape vLLM's CPU attention runs (head size 64)."""
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path / "tiny", hidden=128, inter=256, heads=2, kv_heads=1, max_pos=2048)


def test_w8a8_is_served_by_vllms_int8_kernel_with_the_plugin_off_and_exactly_with_it_on(tiny_text, tmp_path):
    """GPTQ W8A8 after SmoothQuant, our plugin not even loaded (VLLM_PLUGINS=""): vLLM's compressed-tensors method
    and its own int8 kernel run every linear; `eval --engine vllm` scores it, and its perplexity is our int8
    kernel's (exact int32 arithmetic) within 2%: vLLM's oneDNN GEMM on AVX2 CPUs is not bit-exact (max gap 0.06
    in log-probability measured here on this model). vLLM's AMX kernel takes only bf16/fp16 activations, so on
    AMX CPUs vLLM alone runs it in bf16, and with our plugin loaded a float32 engine runs on ours."""
    import os

    from compress_export.core.hardware import saturating_int8_gemm
    from compress_export.kernels.int8 import extension as int8_extension
    from compress_export.pipeline.compress import compress
    from compress_export.pipeline.config import CompressionConfig

    out = tmp_path / "w8a8"
    tiny = _tiny_vllm_model(tmp_path)
    compress(
        tiny,
        out,
        CompressionConfig(
            scheme="W8A8", method="gptq", smoothquant=0.5, dataset=str(tiny_text), num_samples=8, seq_len=32
        ),
        progress=False,
    )
    hf = json.loads((out / "config.json").read_text())
    wants_half = run_code(f"print(R.vllm_int8_wants_half({hf!r}))")[0] == "True"
    text = tmp_path / "eval.txt"
    text.write_text(tiny_text.read_text())
    runs = {}
    vllm_dtype = ("--dtype", "bfloat16") if wants_half else FP32
    for engine, plugins, dtype in (("vllm", "", vllm_dtype), ("torch", "", FP32), ("plugin", None, FP32)):
        env = {**os.environ, "VLLM_PLUGINS": plugins} if plugins is not None else os.environ
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "compress_export.cli.main",
                "eval",
                str(out),
                "--text",
                str(text),
                "--window",
                "64",
                "--windows",
                "4",
                "--engine",
                engine.replace("plugin", "vllm"),
                "--json",
                *dtype,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-4000:]
        runs[engine] = json.loads(r.stdout)
    v, ours = runs["vllm"], runs["torch"]["token_perplexity"]
    assert "compressed-tensors" in v["engine"] and v["kernels"], v
    assert all(k.startswith("vllm:") for k in v["kernels"]), v["kernels"]
    assert v["token_perplexity"] == pytest.approx(ours, rel=0.02)
    # With our plugin loaded, float32: where vLLM's int8 GEMM saturates (x86 without VNNI) or refuses float32 (its
    # AMX kernel), ours runs every linear and vLLM's perplexity is our loader's exact one; elsewhere vLLM keeps it.
    p = runs["plugin"]
    if (saturating_int8_gemm() or wants_half) and int8_extension() is not None:
        assert set(p["kernels"]) == {"compress_export:int8-dynamic"}, p["kernels"]
        assert p["token_perplexity"] == pytest.approx(ours, rel=1e-4), (p, ours)
    else:
        assert all(k.startswith("vllm:") for k in p["kernels"]), p["kernels"]


def test_lowrank_adapter_is_served_as_a_lora_and_fused_and_matches_our_loader(tiny_text, tmp_path):
    """GPTQ W2 + rank 16 correction: vLLM with OUT/lowrank as a LoRA on our plugin's kernel, and with the correction
    fused into our plugin's linears (COMPRESS_EXPORT_LOWRANK=fused, no LoRA), gives our loader's log-probabilities
    (which apply the adapter); without the adapter they differ, so the check can fail."""
    from transformers import AutoTokenizer

    from compress_export.integrations.conformance import compare_top1
    from compress_export.pipeline.compress import compress
    from compress_export.pipeline.config import CompressionConfig

    out = tmp_path / "w2r16"
    compress(
        _tiny_vllm_model(tmp_path),
        out,
        CompressionConfig(
            method="gptq", bits=2, group_size=32, lowrank_rank=16, dataset=str(tiny_text), num_samples=8, seq_len=32
        ),
        progress=False,
    )
    ids = AutoTokenizer.from_pretrained(str(out))(tiny_text.read_text())["input_ids"][:96]
    res = vllm_check(out, tmp_path, ids, args=[*FP32, "--lora", str(out / "lowrank")])
    assert res["quantization"] == "compress_export" and res["lora"], res
    with_adapter = compare_top1(out, ids, res)
    assert with_adapter["max_abs_dlogprob"] < 1e-3, with_adapter
    fused = vllm_check(out, tmp_path, ids, env={"COMPRESS_EXPORT_LOWRANK": "fused"}, args=FP32)
    assert fused["quantization"] == "compress_export" and not fused["lora"], fused
    assert compare_top1(out, ids, fused)["max_abs_dlogprob"] < 1e-3
    import torch

    from compress_export.io.loading import load_model

    plain, _ = load_model(out, lowrank=False)
    with torch.no_grad():
        logp = torch.log_softmax(plain(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    gap = (logp.gather(1, torch.tensor(res["top1"])[:, None])[:, 0] - torch.tensor(res["top1_logprob"])).abs().max()
    assert float(gap) > 10 * with_adapter["max_abs_dlogprob"] + 1e-3


def test_sparse24_runs_in_vllm_and_agrees_with_our_loader(smollm2_s24, eval_txt, tmp_path):
    """vLLM has no 2:4 kernel any more: our plugin claims the checkpoint and runs the registry's kernel."""
    from compress_export.integrations.conformance import compare_top1, first_window_ids

    ids = first_window_ids(smollm2_s24, eval_txt)
    res = vllm_check(smollm2_s24, tmp_path, ids, args=FP32)
    assert res["quantization"] == "compress_export" and res["text"].strip(), res
    conf = compare_top1(smollm2_s24, ids, res)
    print("sparse24", conf)
    assert conf["top1_agreement"] >= 0.99, conf


def test_plugin_off_runs_vllms_own_kernel_where_it_has_one(smollm2_w4, eval_txt, tmp_path):
    """COMPRESS_EXPORT_VLLM=never: vLLM's own GPTQ method and CPU kernel in bf16, where this vLLM build has one
    (AVX-512 wheels): it reads our GPTQ tensors as our loader does. On AMX CPUs vLLM's default 4-bit path also
    quantizes the activations to int8 (VLLM_CPU_INT4_W4A8; top-1 agreement 0.877 measured on an AMX Xeon), so
    the format is checked on its W4A16 path: 0.969 there, as our own loader run in bf16 (0.969); a misread tensor
    (nibble order, zero points, scales) gives far less. Skipped where vLLM has no kernel for it."""
    from compress_export.integrations.conformance import compare_top1, first_window_ids

    route = run_code("show(R.decide(q, None, hf, act_dtype=torch.bfloat16, device='cpu'))")[0]
    if route["vllm"] is None:
        pytest.skip(f"vLLM has no kernel for GPTQ W4 on this machine: {route['reason']}")
    ids = first_window_ids(smollm2_w4, eval_txt)
    env = {"COMPRESS_EXPORT_VLLM": "never", "VLLM_CPU_INT4_W4A8": "0"}
    res = vllm_check(smollm2_w4, tmp_path, ids, env=env, args=["--dtype", "bfloat16"])
    assert res["quantization"] != "compress_export" and all(k.startswith("vllm:") for k in res["kernels"]), res
    conf = compare_top1(smollm2_w4, ids, res)
    assert conf["top1_agreement"] >= 0.95 and conf["max_abs_dlogprob"] < 0.5, conf  # bf16 against our fp32 loader


ROUTE = """
import json, os, sys
os.environ['VLLM_TARGET_DEVICE'] = 'cpu'
import torch
from compress_export.integrations import vllm_route as R
from compress_export.integrations.vllm_plugin import register
register(); register()  # idempotent
from compress_export.integrations.vllm_method import CompressExportConfig as C
q = {'quant_method': 'gptq', 'bits': 4, 'group_size': 64, 'desc_act': False, 'sym': True}
hf = {'hidden_size': 576, 'intermediate_size': 1536, 'num_attention_heads': 9, 'num_key_value_heads': 3}
def show(r):
    print(json.dumps({'claim': r.claim, 'ours': r.ours, 'vllm': r.vllm, 'reason': r.reason}))
"""


def run_code(code: str, *args) -> list:
    r = subprocess.run([sys.executable, "-c", ROUTE + code, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(ln) if ln.startswith("{") else ln for ln in r.stdout.strip().splitlines()]


def test_plugin_route_on_this_cpu():
    """On any CPU kind with our compiled kernel built, the plugin claims 4-bit GPTQ in either dtype (ours is the
    faster CPU kernel); the user's overrides and other checkpoint formats are respected."""
    from compress_export.kernels.cpu_wna16 import extension

    out = run_code(
        "\n".join(
            [
                "for dt in (torch.float32, torch.bfloat16):",
                "    show(R.decide(q, None, hf, act_dtype=dt))",
                "print(C.override_quantization_method(q, 'awq'), C.override_quantization_method({'quant_method': 'fp8'}, None))",
                "print(C.override_quantization_method(q, 'compress_export'))",
                "os.environ['COMPRESS_EXPORT_VLLM'] = 'never'",
                "print(C.override_quantization_method(q, None))",
                "os.environ['COMPRESS_EXPORT_VLLM'] = 'always'",
                "print(C.override_quantization_method(q, None))",
            ]
        )
    )
    fp32, bf16 = out[:2]
    assert out[2:] == ["None None", "compress_export", "None", "compress_export"]
    assert "float32" in fp32["reason"] or fp32["vllm"] is None  # vLLM's GPTQ runs only fp16/bf16 activations
    if extension() is not None:
        assert fp32["claim"] and bf16["claim"] and fp32["ours"] == bf16["ours"] == "cpu-wna16", out


def test_a_fused_correction_makes_the_plugin_claim_what_it_reads_and_refuses_conflicting_settings():
    """COMPRESS_EXPORT_LOWRANK=fused: where the route would leave a checkpoint to vLLM, the plugin claims it (only
    its linears apply the correction); with COMPRESS_EXPORT_VLLM=never, another --quantization, or a format we do
    not read it stops with an error naming the setting instead of serving the export uncorrected."""
    out = run_code(
        "\n".join(
            [
                "import compress_export.integrations.vllm_method as M",
                "M.decide = lambda *a, **k: R.Route(False, 'left to vLLM')",
                "os.environ['COMPRESS_EXPORT_LOWRANK'] = 'fused'",
                "print(C.override_quantization_method(q, None))",
                "def err(*a):",
                "    try:",
                "        C.override_quantization_method(*a)",
                "    except Exception as e:",
                "        print(type(e).__name__, e)",
                "err({'quant_method': 'fp8'}, None)",
                "err(q, 'awq')",
                "os.environ['COMPRESS_EXPORT_VLLM'] = 'never'",
                "err(q, None)",
            ]
        )
    )
    assert out[0] == "compress_export", out
    assert out[1].startswith("UserError COMPRESS_EXPORT_LOWRANK=fused, but compress-export does not read"), out
    assert out[2].startswith("UserError COMPRESS_EXPORT_LOWRANK=fused needs our plugin") and "awq" in out[2], out
    assert "COMPRESS_EXPORT_VLLM=never" in out[3], out


def test_plugin_steps_aside_where_vllms_cpu_kernel_runs_it_and_ours_does_not():
    """As on an AVX-512 wheel (its 4-bit op present) with our compiled kernel missing: in bf16 vLLM's own
    CPUWNA16 kernel runs the checkpoint and the plugin steps aside; in fp32 vLLM refuses, so the plugin claims.
    With our compiled kernel present the plugin claims in both dtypes."""
    out = run_code(
        "\n".join(
            [
                "R._cpu_op_missing = lambda kernel: None",
                "show(R.decide(q, None, hf, act_dtype=torch.bfloat16, device='cpu'))",
                "real = R.our_kernel",
                "R.our_kernel = lambda *a: 'torch-dequant'",
                "show(R.decide(q, None, hf, act_dtype=torch.bfloat16, device='cpu'))",
                "show(R.decide(q, None, hf, act_dtype=torch.float32, device='cpu'))",
            ]
        )
    )
    from compress_export.kernels.cpu_wna16 import extension

    if extension() is not None:
        assert out[0]["claim"] and out[0]["ours"] == "cpu-wna16" and out[0]["vllm"] == "CPUWNA16LinearKernel"
    assert not out[1]["claim"] and out[1]["vllm"] == "CPUWNA16LinearKernel", out[1]
    assert out[2]["claim"] and "float32" in out[2]["reason"], out[2]


def test_plugin_route_on_a_mocked_cuda_gpu():
    """vLLM's own CUDA configs and kernel selector decide: Marlin runs 4/8-bit symmetric GPTQ and AWQ on Ampere,
    so the plugin steps aside; 2/3-bit, asymmetric GPTQ and group act-order compressed-tensors have no vLLM kernel,
    so it claims them. On a Volta-class GPU (7.0) AWQ's minimum capability (7.5) is not met: claimed."""
    here = Path(__file__).with_name("vllm_mock_cuda.py")
    rows = {}
    for cap in ("8.0", "7.0"):
        r = subprocess.run([sys.executable, str(here), cap], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rows[cap] = {d["case"]: d for d in map(json.loads, r.stdout.strip().splitlines())}
    a = rows["8.0"]
    for case in ("gptq w4 sym static", "gptq w8 sym none", "awq w4 asym none", "compressed-tensors w4 sym none"):
        assert not a[case]["claim"] and "Marlin" in a[case]["vllm"], a[case]
    for case in (
        "gptq w3 sym none",
        "gptq w4 asym none",
        "compressed-tensors w2 sym none",
        "compressed-tensors w4 asym group",
    ):
        assert a[case]["claim"] and a[case]["vllm"] is None, a[case]
    v = rows["7.0"]
    assert v["awq w4 asym none"]["claim"] and "capability 75" in v["awq w4 asym none"]["reason"]
    assert not v["gptq w4 sym static"]["claim"]  # a Triton kernel of vLLM's still runs it there


def test_plugin_claims_awq_and_compressed_tensors_w4a16_and_w8a8_only_where_vllms_int8_gemm_saturates():
    """W8A8 is vLLM's on GPUs and on CPUs with VNNI or AMX; on x86 CPUs without VNNI (oneDNN's saturating int16
    pair sums), and in float32 where vLLM's kernel is its AMX one (bf16/fp16 only), our exact int8 GEMM claims it. Both CPU kinds are decided here from their flags, and this CPU for
    real through vLLM's own entry point."""
    from compress_export.core.hardware import saturating_int8_gemm
    from compress_export.core.scheme import PRESETS, Scheme
    from compress_export.formats.base import FORMATS
    from compress_export.kernels.int8 import extension

    awq = FORMATS.get("awq")().quantization_config(Scheme(4, 64, False), ["lm_head"], {})
    ct = FORMATS.get("compressed-tensors")().quantization_config(Scheme(4, 64, True, "static"), ["lm_head"], {})
    w8a8 = FORMATS.get("compressed-tensors")().quantization_config(PRESETS["W8A8"], ["lm_head"], {})
    code = "\n".join(
        [
            "import json, os, sys",
            "os.environ['VLLM_TARGET_DEVICE'] = 'cpu'",
            "from compress_export.integrations.vllm_method import CompressExportConfig as C",
            "from compress_export.integrations.vllm_route import decide",
            "for q in json.loads(sys.argv[1]):",
            "    print(C.override_quantization_method(q, None))",
            "for dev, flags in (('cpu', ['avx2', 'fma']), ('cpu', ['avx2', 'avx512f', 'avx512_vnni']),",
            "                   ('cpu', ['avx2', 'amx_int8']), ('cuda', ['avx2'])):",
            "    r = decide(q, None, device=dev, flags=frozenset(flags))",
            "    print(r.claim, r.ours, r.reason)",
            "import torch",
            "from compress_export.integrations.vllm_route import vllm_int8_wants_half",
            "print(decide(q, None, act_dtype=torch.float32, device='cpu').claim, vllm_int8_wants_half())",
            "os.environ['COMPRESS_EXPORT_DTYPE'] = 'float32'  # as our launchers set it for --dtype float32",
            "print(C.override_quantization_method(q, None))",
        ]
    )
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps([awq, ct, w8a8])], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    here = "compress_export" if saturating_int8_gemm() and extension() is not None else "None"
    assert lines[-9:-6] == ["compress_export", "compress_export", here], r.stdout
    avx2, vnni, amx, cuda = lines[-6:-2]
    assert avx2.startswith("True int8-dynamic") == (extension() is not None) and "saturating" in avx2, avx2
    assert vnni.startswith("False") and "VNNI" in vnni and amx.startswith("False") and "CUTLASS" in cuda, lines
    # float32 activations here: vLLM's AMX int8 kernel refuses them (AMX CPUs), so ours claims W8A8 where built
    claim_fp32, wants_half = lines[-2].split()
    ours_fp32 = (saturating_int8_gemm() or wants_half == "True") and extension() is not None
    assert claim_fp32 == str(ours_fp32), lines
    assert lines[-1] == ("compress_export" if ours_fp32 else "None"), lines  # the launchers' hint is read


def test_tensor_parallel_shards_load_as_vllm_shards_them():
    """vLLM's own parameter classes shard every checkpoint tensor rank by rank (tests/vllm_tp_shards.py): each
    rank's output equals its slice of the whole linear, from the result before packing. Per-channel scales and
    act-order groups are repeated on every rank of a row-parallel layer (vLLM's auto_gptq does the same); act-order
    shards hold parts of many groups, so they run on the per-column gather kernel."""
    here = Path(__file__).with_name("vllm_tp_shards.py")
    r = subprocess.run([sys.executable, str(here)], capture_output=True, text=True, timeout=600)
    res = read_result(r.stdout)
    assert res, r.stderr[-3000:]
    assert len(res) == 16
    for case, got in res.items():
        assert "error" not in got and got["max_err"] < 5e-4, (case, got)
        uneven = "-group-row" in case and "g-1" not in case
        assert set(got["kernels"]) == ({"torch-dequant"} if uneven else set(got["kernels"]) - {"torch-dequant"}), (
            case,
            got,
        )
