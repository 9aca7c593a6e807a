"""Optimum-style loading and transformers' own auto class, for every format we write: logits against our loader,
packed weights in memory, save_pretrained byte for byte, export on load through the same pipeline, recipes, and
the README's quickstart as written."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_tiny_llama
from safetensors import safe_open

from compress_export import AutoCompressedModelForCausalLM, CompressionConfig
from compress_export.core.scheme import Scheme
from compress_export.integrations.conformance import compare_top1
from compress_export.pipeline.compress import compress

# (name, compress() keyword arguments): every format, 2/3/4/8 bits, act-order, symmetric and not
EXPORTS = [
    ("gptq-w4-static", dict(method="gptq", fmt="gptq", scheme=Scheme(4, 32, True, "static"))),
    ("gptq-w3-actorder", dict(method="gptq", fmt="gptq", scheme=Scheme(3, 32, False, "group"))),
    ("gptq-w2", dict(method="gptq", fmt="gptq", scheme=Scheme(2, 32, False))),
    ("gptq-w8-channel", dict(method="rtn", fmt="gptq", scheme=Scheme(8, -1, True))),
    ("awq-w4", dict(method="awq", fmt="awq", scheme=Scheme(4, 32, False))),
    ("ct-w4-actorder", dict(method="gptq", fmt="compressed-tensors", scheme=Scheme(4, 32, False, "group"))),
    ("sparse24", dict(method="sparsegpt", sparsity="2:4")),
    ("sparse24-w4", dict(method="sparsegpt", sparsity="2:4", scheme=Scheme(4, 32, True))),
    ("dense-50", dict(method="wanda", sparsity="0.5")),
]


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, tiny_text):
    d = tmp_path_factory.mktemp("hf")
    base = make_tiny_llama(d / "tiny", hidden=128, inter=256, heads=2, kv_heads=1, max_pos=512)
    outs = {}
    for name, kw in EXPORTS:
        outs[name] = d / name
        compress(base, outs[name], dataset=str(tiny_text), num_samples=8, seq_len=32, progress=False, **kw)
    return base, outs


def ids_of(tiny_text, n=96):
    from conftest import _tiny_tokenizer

    return _tiny_tokenizer()(tiny_text.read_text())["input_ids"][:n]


@torch.no_grad()
def top1_of(model, ids) -> dict:
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    best = logp.max(dim=-1)
    return {"top1": best.indices.tolist(), "top1_logprob": best.values.tolist()}


def tensors_of(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


@pytest.mark.parametrize("name", [e[0] for e in EXPORTS])
def test_every_format_loads_both_ways_and_agrees_with_our_loader(name, tiny_exports, tiny_text, caplog):
    from transformers import AutoModelForCausalLM

    _, outs = tiny_exports
    out = outs[name]
    ids = ids_of(tiny_text)
    ours = AutoCompressedModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    conf = compare_top1(out, ids, top1_of(ours, ids))
    assert conf["top1_agreement"] >= 0.99 and conf["max_abs_dlogprob"] < 1e-3, conf
    n_packed = sum(type(m).__name__ == "QuantLinear" for m in ours.modules())
    assert n_packed == (0 if name.startswith("dense") else 2 * 7), n_packed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="compress_export"):
        auto = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    conf = compare_top1(out, ids, top1_of(auto, ids))
    assert conf["top1_agreement"] >= 0.99 and conf["max_abs_dlogprob"] < 1e-3, conf
    routes = [r.message for r in caplog.records if "quantizer loads this" in r.message or "loads through" in r.message]
    if name.startswith("dense"):  # dense exports are plain models: nothing to route
        assert routes == []
    else:  # one line says which route; transformers' own only where its backend is installed here
        theirs = (
            name.startswith("ct")
            and have("compressed_tensors")
            or name.startswith("gptq")
            and have("gptqmodel")
            and have("optimum")
            or name.startswith("awq")
            and have("awq")
        )
        assert len(routes) == 1 and ("transformers' own" in routes[0]) == theirs, routes


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_routes_can_be_chosen(tiny_exports, monkeypatch, caplog):
    """COMPRESS_EXPORT_TRANSFORMERS=ours takes compressed-tensors from transformers' own quantizer; =theirs where
    the backend is missing fails with transformers' own error, as without compress-export."""
    from transformers import AutoModelForCausalLM

    _, outs = tiny_exports
    monkeypatch.setenv("COMPRESS_EXPORT_TRANSFORMERS", "ours")
    m = AutoModelForCausalLM.from_pretrained(str(outs["ct-w4-actorder"]), dtype=torch.float32)
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    if not have("optimum"):
        monkeypatch.setenv("COMPRESS_EXPORT_TRANSFORMERS", "theirs")
        with pytest.raises(ImportError, match="optimum"):
            AutoModelForCausalLM.from_pretrained(str(outs["gptq-w4-static"]), dtype=torch.float32)


@pytest.mark.parametrize("name", [e[0] for e in EXPORTS])
def test_save_pretrained_round_trips_byte_for_byte(name, tiny_exports, tmp_path):
    _, outs = tiny_exports
    model = AutoCompressedModelForCausalLM.from_pretrained(outs[name], dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    a, b = tensors_of(outs[name]), tensors_of(tmp_path / "again")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg.get("quantization_config") == json.loads((outs[name] / "config.json").read_text()).get(
        "quantization_config"
    )
    assert (tmp_path / "again" / "tokenizer.json").exists()


def test_generate_and_pipeline(tiny_exports):
    from transformers import AutoTokenizer, pipeline

    _, outs = tiny_exports
    model = AutoCompressedModelForCausalLM.from_pretrained(outs["gptq-w4-static"])
    tok = AutoTokenizer.from_pretrained(str(outs["gptq-w4-static"]))
    out = model.generate(**tok("the quick brown fox", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 4 + 5
    text = pipeline("text-generation", model=model, tokenizer=tok)("the quick", max_new_tokens=3, do_sample=False)
    assert text[0]["generated_text"].startswith("the quick")


def test_export_on_load_is_the_cli_pipeline(tiny_exports, tiny_text, tmp_path):
    """export=True compresses through compress(): the same tensors as the CLI with the same settings; the loaded
    model's save_pretrained writes an export that `compress-export eval` reads."""
    base, _ = tiny_exports
    cfg = CompressionConfig(method="gptq", bits=4, group_size=32, dataset=str(tiny_text), num_samples=8, seq_len=32)
    model = AutoCompressedModelForCausalLM.from_pretrained(base, export=True, quantization_config=cfg, progress=False)
    model.save_pretrained(tmp_path / "saved")
    cli_out = tmp_path / "cli"
    recipe = cfg.save(tmp_path / "recipe.json")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress_export.cli.main",
            "--recipe",
            str(recipe),
            str(base),
            "-o",
            str(cli_out),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    a, b = tensors_of(cli_out), tensors_of(tmp_path / "saved")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress_export.cli.main",
            "eval",
            str(tmp_path / "saved"),
            "--text",
            str(tiny_text),
            "--windows",
            "1",
            "--window",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "token_perplexity" in r.stdout, r.stderr


def test_recipes(tmp_path):
    cfg = CompressionConfig(method="awq", bits=4, group_size=64, symmetric=False, dataset="calib.txt")
    assert CompressionConfig.load(cfg.save(tmp_path / "r.json")) == cfg
    (tmp_path / "bad.json").write_text('{"method": "gptq", "bitz": 4}')
    with pytest.raises(Exception, match=r"unknown setting\(s\) \['bitz'\]; valid ones are"):
        CompressionConfig.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(Exception, match="not valid JSON"):
        CompressionConfig.load(tmp_path / "broken.json")
    assert cfg.with_(bits=None, group_size=32).group_size == 32 and cfg.with_(bits=None).bits == 4


def test_not_an_export_says_what_to_do(tiny_exports):
    base, _ = tiny_exports
    with pytest.raises(Exception, match="not a compressed export.*export=True"):
        AutoCompressedModelForCausalLM.from_pretrained(base)


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(smollm2_w4, tmp_path):
    """The Python quickstart in README.md, run unchanged from a folder where the demo's export path exists."""
    block = re.search(
        r"```python\n((?:(?!```).)*?from_pretrained\(\"out/(?:(?!```).)*?)```", (ROOT / "README.md").read_text(), re.S
    )
    assert block, "README has no Python quickstart"
    out = re.search(r'"(out/[^"]+)"', block.group(1)).group(1)
    (tmp_path / out).parent.mkdir(parents=True)
    (tmp_path / out).symlink_to(smollm2_w4)
    r = subprocess.run(
        [sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout, r.stdout


@pytest.mark.slow
def test_smollm2_stays_packed_in_memory(smollm2, smollm2_w4):
    """Resident weight memory of the loaded W4 export against the bf16 model, both with bf16 embeddings (in float32,
    the unquantized embeddings double): the packed linears, not dense ones."""
    from compress_export.io.loading import load_model
    from compress_export.kernels.linear import weight_bytes

    model = AutoCompressedModelForCausalLM.from_pretrained(smollm2_w4, dtype=torch.bfloat16)
    dense, _ = load_model(smollm2, dtype=torch.bfloat16)
    ratio = weight_bytes(model) / weight_bytes(dense)
    print("resident weights", weight_bytes(model) / 1e6, "MB against bf16", weight_bytes(dense) / 1e6, ratio)
    assert ratio <= 0.45, ratio
