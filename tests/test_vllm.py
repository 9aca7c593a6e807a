"""Real vLLM (CPU backend here) serving our exports through the plugin, offline and over HTTP on 127.0.0.1.

Each run is a subprocess: vLLM spawns engine processes, and a crash must fail the test, not the session.
"""
import json
import subprocess
import sys

import pytest

from conftest import have_vllm

from compress_export.integrations.vllm_check import read_result
from compress_export.scheme import Scheme

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")]


def vllm_check(model_dir, tmp_path, score_ids=None) -> dict:
    cmd = [sys.executable, "-m", "compress_export.integrations.vllm_check", str(model_dir)]
    if score_ids:
        (tmp_path / "ids.json").write_text(json.dumps(score_ids))
        cmd += ["--score-ids", str(tmp_path / "ids.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
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
    res = vllm_check(model_dir, tmp_path, ids)
    assert res["quantization"] == "compress_export"
    assert "Paris" in res["text"], res
    conf = compare_top1(model_dir, ids, res)
    print(export, conf)  # reported: positions, top-1 agreement, max |Δ log p|
    assert conf["positions"] == len(ids) - 1 and conf["top1_agreement"] >= 0.99, conf


TINY_EXPORTS = [("gptq", "gptq", Scheme(4, 32, True, "static")), ("awq", "awq", Scheme(4, 32, False)),
                ("compressed-tensors", "gptq", Scheme(4, 32, False, "group")), ("sparse24", "sparsegpt", None)]


@pytest.mark.parametrize("fmt,method,scheme", TINY_EXPORTS, ids=[t[0] for t in TINY_EXPORTS])
def test_tiny_exports_in_vllm_match_our_loader(fmt, method, scheme, tiny_text, tmp_path):
    """The tiny random Llama (head size 64, as vLLM's CPU attention wants) in every format: vLLM's log-probabilities
    of its top-1 tokens equal our loader's (random weights give near-uniform logits, so the gap, not the top-1
    agreement, is the meaningful check here)."""
    from conftest import make_tiny_llama

    from compress_export.integrations.conformance import compare_top1
    from compress_export.pipeline import compress

    model_dir = make_tiny_llama(tmp_path / "tiny", hidden=128, inter=256, heads=2, kv_heads=1, max_pos=2048)
    out = tmp_path / fmt
    compress(model_dir, out, method=method, fmt=fmt, scheme=scheme, dataset=str(tiny_text), num_samples=8,
             seq_len=32, progress=False, sparsity="2:4" if fmt == "sparse24" else None)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(out))(tiny_text.read_text())["input_ids"][:96]
    res = vllm_check(out, tmp_path, ids)
    assert res["quantization"] == "compress_export", res
    conf = compare_top1(out, ids, res)
    print(fmt, conf)
    assert conf["max_abs_dlogprob"] < 1e-3, conf


def test_sparse24_runs_in_vllm_and_agrees_with_our_loader(smollm2_s24, eval_txt, tmp_path):
    """vLLM has no 2:4 kernel any more: our plugin claims the checkpoint and runs the registry's kernel."""
    from compress_export.integrations.conformance import compare_top1, first_window_ids

    ids = first_window_ids(smollm2_s24, eval_txt)
    res = vllm_check(smollm2_s24, tmp_path, ids)
    assert res["quantization"] == "compress_export" and res["text"].strip(), res
    conf = compare_top1(smollm2_s24, ids, res)
    print("sparse24", conf)
    assert conf["top1_agreement"] >= 0.99, conf


def test_plugin_claims_only_where_vllm_has_no_kernel():
    code = "\n".join([
        "import os",
        "os.environ['VLLM_TARGET_DEVICE'] = 'cpu'",
        "from compress_export.integrations.vllm_plugin import register",
        "register(); register()  # idempotent",
        "from compress_export.integrations.vllm_method import CompressExportConfig as C, vllm_has_kernel",
        "q = {'quant_method': 'gptq', 'bits': 4, 'group_size': 64, 'desc_act': False, 'sym': True}",
        "print(vllm_has_kernel(q), C.override_quantization_method(q, None))",
        "os.environ['COMPRESS_EXPORT_VLLM'] = 'never'",
        "print(C.override_quantization_method(q, None))",
        "os.environ['COMPRESS_EXPORT_VLLM'] = 'auto'",
        "print(C.override_quantization_method(q, 'awq'), C.override_quantization_method({'quant_method': 'fp8'}, None))",
        "print(C.override_quantization_method(q, 'compress_export'))",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()[-4:]
    assert lines == ["False compress_export", "None", "None None", "compress_export"], r.stdout


def test_plugin_claims_awq_and_compressed_tensors_w4a16_but_not_w8a8():
    from compress_export.formats import FORMATS
    from compress_export.scheme import Scheme

    awq = FORMATS.get("awq")().quantization_config(Scheme(4, 64, False), ["lm_head"], {})
    ct = FORMATS.get("compressed-tensors")().quantization_config(Scheme(4, 64, True, "static"), ["lm_head"], {})
    w8a8 = json.loads(json.dumps(ct))
    w8a8["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "dynamic": True}
    w8a8["format"] = w8a8["config_groups"]["group_0"]["format"] = "int-quantized"
    code = "\n".join([
        "import json, os, sys",
        "os.environ['VLLM_TARGET_DEVICE'] = 'cpu'",
        "from compress_export.integrations.vllm_method import CompressExportConfig as C",
        "for q in json.loads(sys.argv[1]):",
        "    print(C.override_quantization_method(q, None))",
    ])
    r = subprocess.run([sys.executable, "-c", code, json.dumps([awq, ct, w8a8])], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-3:] == ["compress_export", "compress_export", "None"], r.stdout
