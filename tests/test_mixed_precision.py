"""Mixed precision under a size budget (--avg-bits, --size-mb; pipeline/mixed.py) end to end on a tiny Llama:
the budget holds on the files written (an independent fact: their headers), every module is written as computed
at its own width, the export reads back and serves, and what cannot be recorded is refused before any work."""

import json

import pytest
import torch
from conftest import assert_written_as_computed, have_vllm, make_tiny_llama, recorder

from compress_export.core.errors import UserError
from compress_export.io import model_io
from compress_export.io.loading import load_model
from compress_export.pipeline.compress import compress
from compress_export.pipeline.config import CompressionConfig

PACKED = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Sizes every width packs (3 bits: multiples of 32), four layers so the allocation has room to differ."""
    return make_tiny_llama(tmp_path_factory.mktemp("mixed") / "tiny", hidden=128, inter=256, layers=4, kv_heads=2)


def _run(tiny, tiny_text, out, **kw):
    results, on_result = recorder()
    cfg = CompressionConfig(
        method=kw.pop("method", "gptq"), group_size=32, dataset=str(tiny_text), num_samples=8, seq_len=32, **kw
    )
    summary = compress(tiny, out, cfg, progress=False, on_result=on_result)
    return summary, results


def _bytes(out, packed_only=True) -> int:
    """Bytes of the tensors the export's headers list (the packed linears' only, or all)."""
    index = model_io.tensor_index(out)
    return sum(
        model_io.SAFETENSORS_DTYPES[dtype] * int(torch.Size(shape).numel())
        for name, (_, dtype, shape) in index.items()
        if not packed_only or name.rpartition(".")[2] in PACKED
    )


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_average_bits_fit_between_the_uniform_exports_and_each_module_is_written_at_its_width(
    tiny, tiny_text, tmp_path, method
):
    sizes = {}
    for bits in (3, 4):
        _run(tiny, tiny_text, tmp_path / f"w{bits}", method=method, bits=bits)
        sizes[bits] = _bytes(tmp_path / f"w{bits}")
    summary, results = _run(tiny, tiny_text, tmp_path / "mixed", method=method, avg_bits=3.5)
    got = _bytes(tmp_path / "mixed")
    assert sizes[3] < got <= (sizes[3] + sizes[4]) / 2  # as small as uniform W3.5, and more than W3
    widths = {n: r.scheme.bits for n, r in results.items()}
    assert set(widths.values()) >= {3, 4}, widths
    for i in range(4):  # linears sharing an input share a width (one matrix in the pass, one fused layer in engines)
        p = f"model.layers.{i}"
        assert len({widths[f"{p}.self_attn.{x}"] for x in ("q_proj", "k_proj", "v_proj")}) == 1
        assert widths[f"{p}.mlp.gate_proj"] == widths[f"{p}.mlp.up_proj"]
    assert_written_as_computed(tmp_path / "mixed", results)
    qcfg = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert qcfg["compress_export"]["mixed_precision"] == {"avg_bits": 3.5, "size_mb": None, "bits": [3, 4, 8]}
    assert any("mixed precision, 3.5 average bits" in line for line in summary.lines())
    model, _ = load_model(tmp_path / "mixed")  # checks every module against the layout of its own width
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_mixed_compressed_tensors_export_reads_in_the_library_as_we_wrote_it(tiny, tiny_text, tmp_path):
    """The per-module schemes as llm-compressor writes them (one config group targeting every Linear, one per
    other width naming its modules): transformers with the compressed-tensors library computes what ours does."""
    pytest.importorskip("compressed_tensors")
    from compress_export.integrations.conformance import compare_reference

    out = tmp_path / "ct"
    _, results = _run(tiny, tiny_text, out, format="compressed-tensors", avg_bits=3.5)
    widths = {r.scheme.bits for r in results.values()}
    assert widths >= {3, 4}
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == len(widths) and groups["group_0"]["targets"] == ["Linear"]
    assert_written_as_computed(out, results)
    r = compare_reference(out, tiny_text, window=64)
    assert r["top1_agreement"] >= 0.99 and r["max_abs_dlogit"] < 1e-3, r


def test_the_budget_extremes_give_the_uniform_widths(tiny, tiny_text, tmp_path):
    for avg, want in ((3, 3), (8, 8)):
        _, results = _run(tiny, tiny_text, tmp_path / f"a{avg}", method="rtn", avg_bits=avg, mixed_bits=(3, 8))
        assert {r.scheme.bits for r in results.values()} == {want}


def test_a_size_in_megabytes_bounds_the_whole_export(tiny, tiny_text, tmp_path):
    _run(tiny, tiny_text, tmp_path / "w4", method="rtn", bits=4)
    _run(tiny, tiny_text, tmp_path / "w8", method="rtn", bits=8)
    budget = (_bytes(tmp_path / "w4", False) + _bytes(tmp_path / "w8", False)) / 2
    _, results = _run(tiny, tiny_text, tmp_path / "mb", method="rtn", size_mb=budget / 1e6)
    assert _bytes(tmp_path / "mb", False) <= budget
    assert {r.scheme.bits for r in results.values()} & {4, 8} == {4, 8}
    with pytest.raises(UserError, match="already takes"):
        _run(tiny, tiny_text, tmp_path / "small", method="rtn", size_mb=0.01)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(format="awq", method="awq"), "written as --format gptq/compressed-tensors"),
        (dict(sparsity="2:4", method="sparsegpt", format="gptq", bits=4), "unpruned"),
        (dict(method="awq", format="gptq"), "--method gptq or rtn"),
        (dict(avg_bits=9.0), "outside --mixed-bits 3..8"),
        (dict(size_mb=1.0), "both set a size budget"),
        (dict(avg_bits=None, size_mb=1.0, lowrank_rank=8), "adds an adapter"),
        (dict(avg_bits=None, mixed_bits=(2, 4)), "add --avg-bits or --size-mb"),
    ],
)
def test_what_mixed_precision_cannot_record_is_refused_before_any_work(tiny, tmp_path, kw, match):
    settings = dict(avg_bits=3.5, group_size=32)
    settings.update(kw)
    with pytest.raises(UserError, match=match):
        compress(tiny, tmp_path / "o", CompressionConfig(**settings), progress=False)
    assert not (tmp_path / "o").exists()


def test_opt_350m_without_a_final_norm_is_refused_naming_the_real_cause(tmp_path):
    """OPT-350m's shape: config.json turns the final layer norm off (do_layer_norm_before=false) and project_out
    maps the layers' 64 wide output to the 32 wide head; the sensitivity sweep cannot run it, and the preflight says
    that, not that the family is unknown."""
    from conftest import _tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "opt", vocab_size=64, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
        word_embed_proj_dim=32, do_layer_norm_before=False, max_position_embeddings=1024,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "opt"))
    _tiny_tokenizer().save_pretrained(str(tmp_path / "opt"))
    with pytest.raises(UserError) as e:
        compress(tmp_path / "opt", tmp_path / "o", CompressionConfig(avg_bits=3.5, group_size=32), progress=False)
    assert "no final norm in this configuration (model.decoder.final_layer_norm is None)" in str(e.value)
    assert "drop --avg-bits/--size-mb and give one --bits" in str(e.value)
    assert "model.decoder.project_out before the output head" in str(e.value)
    assert "FAMILIES" not in str(e.value) and not (tmp_path / "o").exists()


def test_a_disk_too_small_for_the_sensitivity_spool_is_refused_before_any_weight_is_read(tiny, tmp_path, monkeypatch):
    """The spool needs layers × samples × seq-len × hidden × 4 bytes beside the output: known from config.json and
    the flags, so a disk too small for it stops the run in the preflight, naming what to change."""
    import collections
    import shutil

    from compress_export.io.source import StreamedSource, build_skeleton

    cfg = build_skeleton(tiny).config
    need = cfg.num_hidden_layers * 16 * 64 * cfg.hidden_size * 4
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, need))  # 5% short
    read = []
    monkeypatch.setattr(StreamedSource, "load_layer", lambda *a: read.append(a) or pytest.fail("a layer was read"))
    settings = CompressionConfig(avg_bits=3.5, group_size=32, num_samples=16, seq_len=64)
    with pytest.raises(UserError, match=r"sensitivity sweep spools .* lower --num-samples or --seq-len"):
        compress(tiny, tmp_path / "o", settings, progress=False)
    assert not read and not (tmp_path / "o").exists()


def test_a_moe_model_is_refused_before_any_weight_is_read(tmp_path, tiny_text):
    from test_moe import tiny_moe

    with pytest.raises(UserError, match="MoE experts"):
        compress(tiny_moe(tmp_path / "moe"), tmp_path / "o", CompressionConfig(avg_bits=3.5, group_size=32))


def test_a_streamed_layer_measured_then_read_again_keeps_its_buffers(tiny, tmp_path):
    """Mixed precision's measuring sweep frees each layer's weights and the pass reads it again: a buffer the
    checkpoint does not hold (a per-layer rotary table) must survive, and the weights come back as stored."""
    from compress_export.core.structure import describe
    from compress_export.io.source import build_skeleton, open_source

    skeleton = build_skeleton(tiny)
    source = open_source(tiny, skeleton, model_io.tensor_index(tiny), True, False)
    assert source.streamed
    layout = describe(source.model)
    layer = source.load_layer(layout, 0)
    want = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer.register_buffer("table", torch.arange(4.0), persistent=False)
    source.unload_layer(layout, 0)
    assert all(p.is_meta for p in layer.parameters()) and not layer.table.is_meta
    layer = source.load_layer(layout, 0)
    assert torch.equal(layer.table, torch.arange(4.0))
    for n, p in layer.named_parameters():
        assert torch.equal(p, want[n]), n


def test_the_cli_takes_the_budget_flags(tiny, tiny_text, tmp_path, capsys):
    from compress_export.cli.main import main

    rc = main(
        [str(tiny), "-o", str(tmp_path / "o"), "--method", "rtn", "--group-size", "32", "--avg-bits", "3.5",
         "--mixed-bits", "3,4", "--dataset", str(tiny_text), "--num-samples", "4", "--seq-len", "16"]
    )  # fmt: skip
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "mixed precision, 3.5 average bits from 3/4 bits" in out and "q_proj+k_proj+v_proj" in out


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_vllm_serves_a_mixed_export_through_our_plugin(tiny_text, tmp_path, fmt):
    """vLLM's own CPU methods take 4-bit only: our plugin claims the export and builds each layer (fused
    qkv_proj and gate_up_proj included) at its own width; its log-probabilities equal our loader's."""
    from test_vllm import _tiny_vllm_model, vllm_matches_our_loader

    out = tmp_path / "out"
    _, results = _run(_tiny_vllm_model(tmp_path), tiny_text, out, avg_bits=3.5, format=fmt)
    assert {r.scheme.bits for r in results.values()} >= {3, 4}
    res = vllm_matches_our_loader(out, tmp_path, tiny_text)
    assert all(k.startswith("compress_export:") for k in res["kernels"]), res["kernels"]
