"""The export validator (compress_export/export_check.py) and every verb that runs it: tiny exports in each format,
intact and broken, checked against facts worked out by hand for the tiny Llama of conftest (hidden 64, MLP 128,
4 query heads and 2 key/value heads of 16, 2 layers, vocabulary 64, tied head; groups of 32)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress_export.cli.main import main
from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.io.export_check import check_export, check_perplexity
from compress_export.pipeline.compress import compress

KINDS = {
    "gptq": dict(method="rtn", fmt="gptq", scheme=Scheme(4, 32, True)),
    "awq": dict(method="rtn", fmt="awq", scheme=Scheme(4, 32, False)),
    "compressed-tensors": dict(method="rtn", fmt="compressed-tensors", scheme=Scheme(4, 32, False)),
    "w8a8": dict(method="rtn", fmt="compressed-tensors", scheme=Scheme(8, -1, True, act_bits=8)),
    "sparse24": dict(method="magnitude", sparsity="2:4", scheme=None),
    "sparse24-w4": dict(method="magnitude", sparsity="2:4", scheme=Scheme(4, 32, False)),
    "dense": dict(method="magnitude", sparsity="0.5", fmt="dense", scheme=None),
}
FORMAT_NAME = {
    "gptq": "gptq",
    "awq": "awq",
    "compressed-tensors": "compressed-tensors",
    "w8a8": "compressed-tensors",
    "sparse24": "sparse24",
    "sparse24-w4": "sparse24",
    "dense": "dense",
}
QUANTIZED = [k for k in KINDS if k != "dense"]
# the tensor each format stores for every packed linear
PRIMARY = {
    "gptq": "qweight",
    "awq": "qweight",
    "compressed-tensors": "weight_packed",
    "w8a8": "weight_scale",
    "sparse24": "weight_idx",
    "sparse24-w4": "weight_idx",
}
# o_proj (64 → 64)'s scale with its first dimension cut by one: (name, shape then, shape it needs)
SCALE = {
    "gptq": ("scales", [1, 64], [2, 64]),
    "awq": ("scales", [1, 64], [2, 64]),
    "compressed-tensors": ("weight_scale", [63, 2], [64, 2]),
    "w8a8": ("weight_scale", [63, 1], [64, 1]),
    "sparse24-w4": ("weight_scale", [63, 2], [64, 2]),
    "sparse24": ("weight_values", [63, 32], [64, 32]),
    "dense": ("weight", [63, 64], [64, 64]),
}
LINEARS = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (64, 32),
    "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (64, 128),
    "mlp.up_proj": (64, 128),
    "mlp.down_proj": (128, 64),
}  # (in, out)
O_PROJ = "model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("export-check")
    for name, kw in KINDS.items():
        compress(tiny_model, d / name, progress=False, dataset=None, **kw)
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from conftest import TINY_TEXT

    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(TINY_TEXT)
    return p


def broken(src, dst, tensors=None, config=None):
    """A copy of the export at src with its tensors and/or config.json edited in place by the given functions."""
    shutil.copytree(src, dst)
    if tensors:
        t = load_file(str(dst / "model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *args) -> str:
    """The verb exits 2 with one error line and no traceback; returns the line."""
    rc, _, err = run(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.startswith("compress-export: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def refusal(path, **kw) -> str:
    with pytest.raises(UserError) as e:
        check_export(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_intact_export_passes_from_its_headers_alone(kind, exports, monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("the check read tensor data")

    import safetensors
    import safetensors.torch

    monkeypatch.setattr(safetensors, "safe_open", no_data)
    monkeypatch.setattr(safetensors.torch, "load_file", no_data)
    monkeypatch.setattr(torch, "load", no_data)
    info = check_export(exports / kind)
    assert info.fmt.name == FORMAT_NAME[kind]
    want = {} if kind == "dense" else {f"model.layers.{i}.{m}": s for i in range(2) for m, s in LINEARS.items()}
    assert info.packed == want
    assert "lm_head.weight" not in info.index  # tied: the embedding is the head


def test_an_unquantized_model_is_a_model_but_not_an_export(tiny_model):
    assert check_export(tiny_model, quantized=False).fmt is None
    assert "not an export" in refusal(tiny_model)


@pytest.mark.parametrize("kind", QUANTIZED)
def test_a_missing_primary_tensor_is_named_by_check_convert_and_eval(kind, exports, tmp_path, text, capsys):
    name = f"model.layers.1.mlp.up_proj.{PRIMARY[kind]}"
    d = broken(exports / kind, tmp_path / "b", lambda t: t.pop(name))
    assert f"{name} is missing" in refusal(d)
    assert name in refused(capsys, "convert", d, "--format", "gptq", "-o", tmp_path / "c")
    assert name in refused(capsys, "eval", d, "--text", text, "--window", "64", "--windows", "1")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_wrong_hidden_size_is_refused_by_every_verb(kind, exports, tmp_path, text, capsys):
    d = broken(exports / kind, tmp_path / "b", config=lambda c: c.update(hidden_size=32))
    msg = refusal(d)
    assert "hidden_size=32" in msg and "model.embed_tokens.weight has shape [64, 64]" in msg, msg
    assert "needs [64, 32]" in msg, msg
    for args in (
        ("convert", d, "--format", "gptq", "-o", tmp_path / "c"),
        ("check", d),
        ("eval", d, "--text", text, "--window", "64", "--windows", "1"),
    ):
        assert "hidden_size=32" in refused(capsys, *args)


@pytest.mark.parametrize("kind", ["gptq", "compressed-tensors", "sparse24", "dense"])
def test_unknown_tensors_are_named(kind, exports, tmp_path, capsys, text):
    def add(t):
        t["model.layers.0.mlp.extra"] = torch.zeros(3)

    d = broken(exports / kind, tmp_path / "b", add)
    assert "model.layers.0.mlp.extra is not a tensor of this llama model" in refusal(d)
    assert "model.layers.0.mlp.extra" in refused(capsys, "eval", d, "--text", text, "--window", "64")
    if kind != "dense":  # under a packed linear: not one of its format's tensors
        d = broken(exports / kind, tmp_path / "c", lambda t: t.update({f"{O_PROJ}.qextra": torch.zeros(2)}))
        assert f"{O_PROJ}.qextra is not a tensor of a packed {FORMAT_NAME[kind]} linear" in refusal(d)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_wrong_shaped_scale_is_named_with_the_shape_it_needs(kind, exports, tmp_path, text, capsys):
    k, got, want = SCALE[kind]
    d = broken(exports / kind, tmp_path / "b", lambda t: t.update({f"{O_PROJ}.{k}": t[f"{O_PROJ}.{k}"][:-1]}))
    msg = refusal(d)
    assert f"{O_PROJ}.{k} has shape {got}" in msg and f"needs {want}" in msg, msg
    assert f"{O_PROJ}.{k}" in refused(capsys, "eval", d, "--text", text, "--window", "64")


def test_integer_widths_and_the_recorded_shape_are_checked(exports, tmp_path):
    d = broken(exports / "gptq", tmp_path / "w", lambda t: t.update({f"{O_PROJ}.qzeros": t[f"{O_PROJ}.qzeros"].long()}))
    assert f"{O_PROJ}.qzeros is I64; gptq stores it as int32" in refusal(d)
    d = broken(exports / "gptq", tmp_path / "f", lambda t: t.update({f"{O_PROJ}.scales": t[f"{O_PROJ}.scales"].int()}))
    assert f"{O_PROJ}.scales is I32; gptq stores it as float16" in refusal(d)
    # compressed-tensors' weight_shape is data: its two numbers must be the linear's [out, in]
    d = broken(
        exports / "compressed-tensors",
        tmp_path / "s",
        lambda t: t.update({f"{O_PROJ}.weight_shape": torch.tensor([64, 65])}),
    )
    assert f"{O_PROJ}.weight_shape says [64, 65]; the linear is [64, 64]" in refusal(d)


def test_an_act_order_g_idx_cannot_be_left_out(tiny_model, tmp_path):
    out = tmp_path / "ao"
    compress(
        tiny_model,
        out,
        method="gptq",
        fmt="gptq",
        scheme=Scheme(4, 32, True, "group"),
        progress=False,
        dataset=None,
        num_samples=2,
        seq_len=16,
    )
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    assert f"{O_PROJ}.g_idx is missing" in refusal(broken(out, tmp_path / "b", lambda t: t.pop(f"{O_PROJ}.g_idx")))
    plain = tmp_path / "plain"  # without act-order a missing g_idx is the trivial one: allowed
    compress(tiny_model, plain, method="rtn", fmt="gptq", scheme=Scheme(4, 32, True), progress=False, dataset=None)
    check_export(broken(plain, tmp_path / "c", lambda t: t.pop(f"{O_PROJ}.g_idx")))


def test_an_untied_head_must_be_stored(tmp_path):
    from conftest import make_tiny_llama

    base = make_tiny_llama(tmp_path / "untied", tie=False)
    out = tmp_path / "o"
    compress(base, out, method="rtn", fmt="gptq", scheme=Scheme(4, 32, True), progress=False, dataset=None)
    assert "lm_head.weight" in check_export(out).index
    assert "lm_head.weight is missing" in refusal(broken(out, tmp_path / "b", lambda t: t.pop("lm_head.weight")))


@pytest.mark.parametrize("where", ["scale", "norm"])
@pytest.mark.parametrize("kind", ["gptq", "compressed-tensors", "sparse24-w4", "dense"])
def test_nan_in_a_scale_or_a_norm_is_refused_naming_the_tensor(kind, where, exports, tmp_path, text, capsys):
    name = f"{O_PROJ}.{SCALE[kind][0]}" if where == "scale" else "model.layers.1.post_attention_layernorm.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")

    d = broken(exports / kind, tmp_path / "b", poison)
    check_export(d)  # the headers are fine: the values are what is wrong
    msg = refused(capsys, "eval", d, "--text", text, "--window", "64")
    assert f"tensor {name} has NaN or Inf" in msg, msg
    if kind != "dense":  # convert reads quantized exports only
        assert f"tensor {name} has NaN or Inf" in refused(
            capsys, "convert", d, "--format", "gptq", "-o", tmp_path / "c"
        )
        assert not (tmp_path / "c").exists()


def test_a_model_that_computes_nan_is_an_error_not_a_perplexity(exports, tmp_path, text, capsys):
    name = "model.layers.0.input_layernorm.weight"  # finite, but attention scores overflow fp32
    d = broken(exports / "gptq", tmp_path / "b", lambda t: t.update({name: torch.full_like(t[name], 3e38)}))
    msg = refused(capsys, "eval", d, "--text", text, "--window", "64", "--windows", "2")
    assert "computes non-finite values" in msg and "token perplexity nan" in msg and "norm weights" in msg, msg
    for bad in (float("nan"), float("inf"), None):  # what vLLM's run may hand back too
        with pytest.raises(UserError, match="non-finite"):
            check_perplexity(d, {"token_perplexity": 5.0, "word_perplexity": bad, "byte_perplexity": 2.0}, text, "vllm")
    check_perplexity(d, {"token_perplexity": 5.0, "word_perplexity": 9.0, "byte_perplexity": 2.0}, text, "vllm")


def test_eval_flags_and_texts(exports, tmp_path, text, capsys):
    d = exports / "gptq"
    assert "--window must be at least 2" in refused(capsys, "eval", d, "--text", text, "--window", "0")
    assert "--windows must be at least 1" in refused(capsys, "eval", d, "--text", text, "--windows", "0")
    for body in ("", " \n\n"):
        (tmp_path / "empty.txt").write_text(body)
        assert f"--text {tmp_path / 'empty.txt'} is empty" in refused(
            capsys, "eval", d, "--text", tmp_path / "empty.txt"
        )
    (tmp_path / "short.txt").write_text("the quick brown fox")  # 4 words: 4 tokens of the tiny word-level vocab
    msg = refused(capsys, "eval", d, "--text", tmp_path / "short.txt", "--window", "64")
    assert f"--text {tmp_path / 'short.txt'} has 4 tokens, fewer than one 64-token window" in msg, msg
    rc, out, err = run(capsys, "eval", d, "--text", text, "--window", "64", "--windows", "2")
    assert rc == 0 and "token ppl" in out and "(2×64 tokens" in out, err


def test_several_problems_are_one_line_with_a_count(exports, tmp_path):
    def two(t):
        t.pop(f"{O_PROJ}.qweight")
        t["model.zzz"] = torch.zeros(1)

    msg = refusal(broken(exports / "gptq", tmp_path / "b", two))
    assert msg.count(" problems, e.g. ") == 1 and f"{O_PROJ}.qweight is missing" in msg and "model.zzz" in msg
    assert "write or download it again" in msg


def test_a_tensor_stored_twice_is_refused(exports, tmp_path):
    d = broken(exports / "gptq", tmp_path / "b")
    save_file({"model.norm.weight": torch.ones(64)}, str(d / "extra.safetensors"))
    msg = refusal(d)
    assert "model.norm.weight" in msg and "extra.safetensors" in msg and "model.safetensors" in msg, msg


def test_serve_and_from_pretrained_refuse_before_their_engine(exports, tmp_path, capsys):
    from compress_export import AutoCompressedModelForCausalLM

    d = broken(exports / "gptq", tmp_path / "b", lambda t: t.pop(f"{O_PROJ}.qweight"))
    assert f"{O_PROJ}.qweight is missing" in refused(capsys, "serve", d)
    with pytest.raises(UserError, match=f"{O_PROJ}.qweight is missing"):
        AutoCompressedModelForCausalLM.from_pretrained(d)


@pytest.mark.vllm
def test_the_vllm_plugin_checks_each_folder_once(exports, tmp_path):
    """vLLM hands our method the model's transformers config; its name_or_path is the folder. A hub id or a
    checkpoint compress-export did not write (even in a format we read) is left alone."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from compress_export.integrations import vllm_method

    d = broken(exports / "gptq", tmp_path / "b", lambda t: t.pop(f"{O_PROJ}.qweight"))
    qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
    with pytest.raises(UserError, match=f"{O_PROJ}.qweight is missing"):
        vllm_method.check_export_folder(qcfg, SimpleNamespace(name_or_path=str(d)))
    vllm_method.check_export_folder(qcfg, SimpleNamespace(name_or_path="someone/a-hub-model"))
    foreign = broken(d, tmp_path / "foreign", config=lambda c: c["quantization_config"].pop("quantizer"))
    vllm_method.check_export_folder(qcfg, SimpleNamespace(name_or_path=str(foreign)))  # broken, but not ours
    vllm_method.check_export_folder(qcfg, SimpleNamespace(name_or_path=str(exports / "gptq")))


# names transformers converts on load, buffers it drops, and verbs that build no model -----------------------------


def gptq_linear(prefix: str, in_f: int, out_f: int) -> dict:
    """A GPTQ W4 g32 linear's tensors (zeros), shapes as the gptq format lays them out."""
    from compress_export.formats.base import FORMATS

    layout = FORMATS.get("gptq")().tensor_layout(Scheme(4, 32, True), in_f, out_f)
    return {f"{prefix}.{k}": torch.zeros(spec.shape, dtype=spec.dtype) for k, spec in layout.items()}


@pytest.fixture(scope="module")
def unfused_mixtral(tmp_path_factory, exports):
    """A tiny Mixtral GPTQ export written as AutoGPTQ writes them: per-expert `block_sparse_moe.experts.N.w1/w2/w3`
    (transformers 5 builds fused `mlp.experts.gate_up_proj`/`down_proj` and converts these names on load)."""
    from transformers import AutoConfig

    d = tmp_path_factory.mktemp("mixtral") / "gptq"
    d.mkdir()
    cfg = AutoConfig.for_model(
        "mixtral",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    ).to_dict()
    cfg["quantization_config"] = json.loads((exports / "gptq" / "config.json").read_text())["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    t = {
        "model.embed_tokens.weight": torch.zeros(64, 64, dtype=torch.float16),
        "model.norm.weight": torch.ones(64, dtype=torch.float16),
    }
    for i in range(2):
        L = f"model.layers.{i}"
        for m, (in_f, out_f) in LINEARS.items():
            if m.startswith("self_attn."):
                t.update(gptq_linear(f"{L}.{m}", in_f, out_f))
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"{L}.{n}.weight"] = torch.ones(64, dtype=torch.float16)
        t[f"{L}.block_sparse_moe.gate.weight"] = torch.zeros(4, 64, dtype=torch.float16)
        for e in range(4):
            for w, (in_f, out_f) in {"w1": (64, 128), "w3": (64, 128), "w2": (128, 64)}.items():
                t.update(gptq_linear(f"{L}.block_sparse_moe.experts.{e}.{w}", in_f, out_f))
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_unfused_moe_experts_pass_with_each_expert_checked_against_its_own_layout(unfused_mixtral, tmp_path):
    info = check_export(unfused_mixtral)
    assert info.packed["model.layers.0.self_attn.k_proj"] == (64, 32)  # from the skeleton
    assert info.packed["model.layers.1.block_sparse_moe.experts.3.w1"] == (64, 128)  # from its own qweight
    assert info.packed["model.layers.1.block_sparse_moe.experts.3.w2"] == (128, 64)
    assert len(info.packed) == 2 * (4 + 4 * 3)
    # an expert whose tensors disagree with each other is still refused
    w2 = "model.layers.0.block_sparse_moe.experts.1.w2"
    d = broken(unfused_mixtral, tmp_path / "b", lambda t: t.update({f"{w2}.scales": t[f"{w2}.scales"][:-1]}))
    assert f"{w2}.scales has shape [3, 64]" in refusal(d)
    w1 = "model.layers.1.block_sparse_moe.experts.2.w1"
    d = broken(unfused_mixtral, tmp_path / "q", lambda t: t.pop(f"{w1}.qweight"))
    assert f"{w1}.qweight is missing" in refusal(d)
    # a tensor outside the layers missing is never taken for a conversion, nor one extra
    d = broken(unfused_mixtral, tmp_path / "n", lambda t: t.pop("model.norm.weight"))
    assert refusal(d).endswith(
        " does not match its config.json: model.norm.weight is missing; the export is "
        "incomplete or was altered: write or download it again"
    )
    d = broken(unfused_mixtral, tmp_path / "x", lambda t: t.update({"model.extra": torch.zeros(2)}))
    assert "model.extra is not a tensor of this mixtral model" in refusal(d)


def test_a_missing_tensor_with_nothing_extra_is_still_refused(exports, tmp_path):
    name = "model.layers.1.post_attention_layernorm.weight"
    assert f"{name} is missing" in refusal(broken(exports / "gptq", tmp_path / "n", lambda t: t.pop(name)))
    d = broken(exports / "gptq", tmp_path / "q", lambda t: [t.pop(k) for k in list(t) if k.startswith(O_PROJ)])
    assert f"{O_PROJ}.weight is missing" in refusal(d)  # every tensor of a linear gone: its plain weight is named


@pytest.mark.parametrize("kind", ["gptq", "compressed-tensors", "dense"])
def test_an_old_rotary_inv_freq_buffer_is_ignored(kind, exports, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    info = check_export(broken(exports / kind, tmp_path / "r", add))
    assert info.fmt.name == FORMAT_NAME[kind] and info.ignored == ("model.layers.0.self_attn.rotary_emb.inv_freq",)


def unbuildable(src, dst):
    """The export at src with a model_type transformers does not know (an architecture only vLLM or remote code
    builds); its tensors are untouched."""
    return broken(
        src, dst, config=lambda c: c.update(model_type="vllm_only_arch", architectures=["VllmOnlyForCausalLM"])
    )


def test_convert_and_check_need_no_model_build(exports, tmp_path):
    from compress_export.integrations.tp_plan import plan
    from compress_export.pipeline.convert import convert

    d = unbuildable(exports / "gptq", tmp_path / "u")
    assert "does not describe a model transformers can build" in refusal(d)  # eval builds the model: refused
    assert plan(d)[2]["ok"] and not plan(d)[8]["ok"]  # 4 query heads: 2 ways yes, 8 ways no
    out = convert(d, "compressed-tensors", str(tmp_path / "ct"))
    got = json.loads((out / "config.json").read_text())
    assert got["model_type"] == "vllm_only_arch" and got["quantization_config"]["format"] == "pack-quantized"
    assert check_export(out, lenient=True).packed[O_PROJ] == (64, 64)


def test_convert_checks_its_output_before_reading_any_tensor(exports, tmp_path, monkeypatch):
    from compress_export.pipeline import convert as convert_mod

    def no_read(*a, **k):
        raise AssertionError("convert read the tensors before checking -o")

    monkeypatch.setattr(convert_mod, "read_export", no_read)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        convert_mod.convert(exports / "gptq", "awq", str(tmp_path / "taken"))
    with pytest.raises(UserError, match="was not written by compress-export"):
        convert_mod.convert(exports / "gptq", "awq", str(tmp_path / "taken"), overwrite=True)
    with pytest.raises(UserError, match="inside the input"):
        convert_mod.convert(exports / "gptq", "awq", str(exports / "gptq" / "sub"))


def test_the_served_check_judges_only_exports_compress_export_wrote(exports, tmp_path, monkeypatch):
    """Installing our vLLM plugin must not make vLLM refuse a foreign GPTQ checkpoint it ran before."""
    from compress_export.io import export_check

    calls = []
    monkeypatch.setattr(export_check, "check_export", lambda p, **kw: calls.append((str(p), kw)))

    def foreign(c):
        c["quantization_config"].pop("quantizer")

    d = broken(exports / "gptq", tmp_path / "foreign", config=foreign)
    assert export_check.check_served_export(d) is False and calls == []
    assert export_check.check_served_export(exports / "gptq") is True
    assert calls == [(str(exports / "gptq"), {"what": "model", "lenient": True})]
