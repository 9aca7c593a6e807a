"""A tiny random Llama through every pass, bit width and act-order into the GPTQ format and back."""

import json

import pytest
import torch
from conftest import assert_written_as_computed, recorder
from safetensors import safe_open

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.io.loading import load_model, read_quantized
from compress_export.kernels import cpu_wna16
from compress_export.passes import PassOptions
from compress_export.pipeline.compress import compress


def run(tiny_model, tiny_text, out, **kw):
    kw.setdefault("scheme", Scheme(4, 32, True, "none"))
    return compress(tiny_model, out, dataset=str(tiny_text), num_samples=8, seq_len=32, progress=False, **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize(
    "bits,group,sym,act",
    [
        (4, 32, True, "none"),
        (3, 32, True, "group"),
        (2, 16, False, "static"),
        (8, -1, True, "none"),
        (4, 64, False, "group"),
    ],
)
def test_export_round_trips_through_our_loader(tiny_model, tiny_text, tmp_path, method, bits, group, sym, act):
    scheme = Scheme(bits, group, sym, act)
    results, on_result = recorder()
    s = run(tiny_model, tiny_text, tmp_path / "out", method=method, scheme=scheme, on_result=on_result)
    assert s.linears == 14 and s.decoder_layers == 2
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == bits and q["group_size"] == group and q["sym"] == sym
    assert q["desc_act"] == (act == "group" and method == "gptq")
    assert_written_as_computed(tmp_path / "out", results)  # the export is exactly the in-memory result
    assert all(qw.codes.max() <= (1 << bits) - 1 for qw in results.values())
    # our loader's dense weights are the in-memory result's, dequantized; the kernel path gives the same logits
    model, _ = load_model(tmp_path / "out")
    kmodel, _ = load_model(tmp_path / "out", mode="kernel")
    ids = torch.randint(3, 60, (2, 16))
    assert torch.allclose(logits(model, ids), logits(kmodel, ids), atol=1e-4)
    for name, qw in results.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())


def test_gptq_tensor_layout_and_tied_embeddings(tiny_model, tiny_text, tmp_path):
    run(tiny_model, tiny_text, tmp_path / "out", method="gptq", scheme=Scheme(4, 32, True, "none"))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        p = "model.layers.0.self_attn.q_proj."
        assert f.get_tensor(p + "qweight").shape == (64 * 4 // 32, 64)
        assert f.get_tensor(p + "qweight").dtype == torch.int32
        assert f.get_tensor(p + "qzeros").shape == (2, 64 * 4 // 32)
        assert f.get_tensor(p + "scales").shape == (2, 64) and f.get_tensor(p + "scales").dtype == torch.float16
        assert f.get_tensor(p + "g_idx").tolist() == [i // 32 for i in range(64)]
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys  # tied: written once
    assert not any(k.endswith("proj.weight") for k in keys)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).exists(), f


def test_gptq_is_closer_than_rtn_on_the_calibration_text(tiny_model, tiny_text, tmp_path):
    ref, tok = load_model(tiny_model)
    ids = tok(tiny_text.read_text(), return_tensors="pt")["input_ids"][:, :128]
    base = logits(ref, ids)
    errs = {}
    for m in ("rtn", "gptq"):
        run(tiny_model, tiny_text, tmp_path / m, method=m, scheme=Scheme(3, 32, True, "none"))
        model, _ = load_model(tmp_path / m)
        errs[m] = (logits(model, ids) - base).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_one_forward_mode_matches_chunked_mode_closely(tiny_model, tiny_text, tmp_path):
    a = run(tiny_model, tiny_text, tmp_path / "a", method="gptq", batch_size=None)
    b = run(tiny_model, tiny_text, tmp_path / "b", method="gptq", batch_size=2)
    _, qa, _ = read_quantized(tmp_path / "a")
    _, qb, _ = read_quantized(tmp_path / "b")
    first = "model.layers.0.self_attn.q_proj"  # same inputs in both modes for the first group
    assert torch.equal(qa[first].codes, qb[first].codes)
    assert a.linears == b.linears


def test_input_directory_is_never_written(tiny_model, tiny_text, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()}
    run(tiny_model, tiny_text, tmp_path / "out", method="rtn")
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model.iterdir()} == before


def test_existing_output_needs_overwrite(tiny_model, tiny_text, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        run(tiny_model, tiny_text, out, method="rtn")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what compress-export wrote: the user's folder stays as it is
    with pytest.raises(UserError, match=r"not written by compress-export \(it holds keep.txt\)"):
        run(tiny_model, tiny_text, out, method="rtn", overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder holds nothing to lose
    run(tiny_model, tiny_text, out, method="rtn", overwrite=True)
    run(tiny_model, tiny_text, out, method="rtn", scheme=Scheme(8, 32, True, "none"), overwrite=True)  # ours: replaced
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_failure_midway_leaves_no_checkpoint(tiny_model, tiny_text, tmp_path, monkeypatch):
    import compress_export.pipeline.compress as pl

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pl, "CheckpointWriter", type("Boom", (pl.CheckpointWriter,), {"finish": boom}))
    with pytest.raises(RuntimeError):
        run(tiny_model, tiny_text, tmp_path / "out", method="rtn")
    assert list(tmp_path.iterdir()) == []


def test_group_size_that_does_not_divide_names_layers_and_fixes(tiny_model, tiny_text, tmp_path):
    with pytest.raises(UserError) as e:
        run(tiny_model, tiny_text, tmp_path / "out", method="rtn", scheme=Scheme(4, 48, True))
    msg = str(e.value)
    assert "--group-size 48" in msg and "q_proj (in=64)" in msg and "down_proj (in=128)" in msg
    assert "32, 64" in msg
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused(tiny_model, tiny_text, tmp_path):
    from conftest import make_tiny_llama
    from safetensors.torch import load_file, save_file

    bad = make_tiny_llama(tmp_path / "bad")
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="up_proj.weight has NaN"):
        run(bad, tiny_text, tmp_path / "out", method="rtn")


def test_asymmetric_gptq_never_writes_zero_point_zero(tiny_model, tiny_text, tmp_path):
    run(tiny_model, tiny_text, tmp_path / "out", method="gptq", scheme=Scheme(2, 16, False))
    _, qweights, _ = read_quantized(tmp_path / "out")
    assert min(int(q.zeros.min()) for q in qweights.values()) >= 1


def test_rtn_needs_no_calibration(tiny_model, tmp_path):
    s = compress(tiny_model, tmp_path / "out", method="rtn", scheme=Scheme(4, 32), progress=False)
    assert s.calibration.startswith("none")


def test_options_reach_the_config(tiny_model, tiny_text, tmp_path):
    run(tiny_model, tiny_text, tmp_path / "out", method="gptq", options=PassOptions(damp=0.05))
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert q["damp_percent"] == 0.05 and q["compress_export"]["method"] == "gptq"
    assert "awq_score" not in q["compress_export"]  # AWQ's own option is recorded only for AWQ exports


def test_awq_score_option_from_the_cli_reaches_the_pass_and_the_config(tiny_model, tiny_text, tmp_path):
    from compress_export.cli.main import main
    from compress_export.core.errors import UserError
    from compress_export.pipeline.config import CompressionConfig

    for score in ("linear", "block"):
        assert (
            main(
                [
                    str(tiny_model),
                    "-o",
                    str(tmp_path / score),
                    "--method",
                    "awq",
                    "--format",
                    "awq",
                    "--group-size",
                    "32",
                    "--dataset",
                    str(tiny_text),
                    "--num-samples",
                    "4",
                    "--seq-len",
                    "32",
                    "--awq-score",
                    score,
                    "-q",
                ]
            )
            == 0
        )
        q = json.loads((tmp_path / score / "config.json").read_text())["quantization_config"]
        assert q["compress_export"]["awq_score"] == score
    _, a, _ = read_quantized(tmp_path / "linear")
    _, b, _ = read_quantized(tmp_path / "block")
    assert any(not torch.equal(a[k].codes, b[k].codes) for k in a)  # the option changed what the pass did
    with pytest.raises(UserError, match="awq_score"):
        CompressionConfig(awq_score="output")


def test_convert_repacks_the_same_numbers_into_every_format(tiny_model, tiny_text, tmp_path):
    from compress_export.pipeline.convert import convert

    run(tiny_model, tiny_text, tmp_path / "g", method="gptq", scheme=Scheme(4, 32, False, "static"))
    _, ref, _ = read_quantized(tmp_path / "g")
    base, _ = load_model(tmp_path / "g")
    ids = torch.randint(3, 60, (2, 16))
    for fmt in ("awq", "compressed-tensors", "gptq"):
        out = convert(tmp_path / "g", fmt, str(tmp_path / fmt))
        _, got, _ = read_quantized(out)
        assert set(got) == set(ref)
        for n in ref:
            assert torch.equal(got[n].dequantize(), ref[n].dequantize()), (fmt, n)
        model, _ = load_model(out)
        assert torch.equal(logits(model, ids), logits(base, ids))


def test_convert_refuses_what_the_target_cannot_store(tiny_model, tiny_text, tmp_path):
    from compress_export.pipeline.convert import convert

    run(tiny_model, tiny_text, tmp_path / "g3", method="gptq", scheme=Scheme(3, 32, True, "group"))
    with pytest.raises(UserError, match="cannot store 3-bit"):
        convert(tmp_path / "g3", "awq", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_every_method_into_every_format(tiny_model, tiny_text, tmp_path, method, fmt, monkeypatch):
    s = run(tiny_model, tiny_text, tmp_path / "o", method=method, fmt=fmt, scheme=Scheme(4, 32, False, "static"))
    assert s.linears == 14
    model, _ = load_model(tmp_path / "o")
    kmodel, _ = load_model(tmp_path / "o", mode="kernel")
    ids = torch.randint(3, 60, (2, 16))
    want = logits(model, ids)
    assert torch.allclose(want, logits(kmodel, ids), atol=1e-4)  # the exact float prefill (conftest)
    # the default int8 prefill (W4A8, 32 rows) rounds each token's activations to int8: a small, bounded change
    # (a packing or scale error would move logits by their whole range)
    monkeypatch.setenv("COMPRESS_EXPORT_PREFILL", "int8")
    err = float((logits(kmodel, ids) - want).abs().max())
    assert err <= 2e-2 * float(want.abs().max()), err
    if cpu_wna16.extension() is not None:  # the int8 path ran (without the extension both paths are torch's)
        assert err > 0


def test_impossible_method_format_pair_fails_before_work(tiny_model, tiny_text, tmp_path):
    with pytest.raises(UserError, match="cannot store 3-bit"):
        run(tiny_model, tiny_text, tmp_path / "o", method="gptq", fmt="awq", scheme=Scheme(3, 32, True))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("batch_size", [None, 4])  # single forward per layer, and the two-pass chunked mode
def test_linears_calibration_never_reaches_are_kept_not_dropped(
    tiny_model, tiny_text, tmp_path, monkeypatch, batch_size
):
    """As MoE experts no calibration token is routed to: layer 0's MLP is skipped in the forward, so its three
    linears never run. They are written unquantized, listed as not quantized, and reported: never dropped."""
    import types

    from compress_export.io import model_io

    real = model_io.load_source_model

    def load(path, **kw):
        model, tok = real(path, **kw)
        model.model.layers[0].mlp.forward = types.MethodType(lambda self, x: x * 0, model.model.layers[0].mlp)
        return model, tok

    monkeypatch.setattr(model_io, "load_source_model", load)
    s = run(
        tiny_model,
        tiny_text,
        tmp_path / "out",
        method="gptq",
        scheme=Scheme(4, 32, True),
        batch_size=batch_size,
        stream=False,
    )  # the patch above is on the in-memory loader
    mlp = [f"model.layers.0.mlp.{n}_proj" for n in ("down", "gate", "up")]
    assert s.kept_dense == mlp and s.linears == 14 - 3
    assert any("kept unquantized" in line for line in s.lines())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(mlp) <= set(cfg["quantization_config"]["modules_not_quantized"])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        src = safe_open(str(tiny_model / "model.safetensors"), "pt")
        for n in mlp:
            assert torch.equal(f.get_tensor(n + ".weight"), src.get_tensor(n + ".weight"))
    model, _ = load_model(tmp_path / "out")  # loads: the kept linears as ordinary weights
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"


def test_overflowing_activations_are_a_user_error_naming_the_layer(tiny_model, tiny_text, tmp_path, monkeypatch):
    """Finite weights (the pre-flight passes) whose activations overflow: the layer whose inputs turned non-finite
    is named, nothing is written."""
    from compress_export.io import model_io

    real = model_io.load_source_model

    def load(path, **kw):
        model, tok = real(path, **kw)
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.fill_(1e38)
        return model, tok

    monkeypatch.setattr(model_io, "load_source_model", load)
    # caught where the overflow starts: o_proj's own scales (before, only as the MLP's NaN inputs)
    with pytest.raises(UserError, match=r"model\.layers\.0\.(self_attn\.o_proj|mlp\.).*NaN or Inf"):
        run(tiny_model, tiny_text, tmp_path / "out", method="gptq", scheme=Scheme(4, 32, True), stream=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
