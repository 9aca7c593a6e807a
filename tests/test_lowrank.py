"""Low-rank error correction (EoRA): the math against an independent derivation, the PEFT adapter on disk, and our
loader applying it."""

import json

import pytest
import torch
from conftest import make_tiny_llama, recorder

from compress_export.core.errors import UserError
from compress_export.io.lowrank import lowrank_correction, read_adapter
from compress_export.pipeline.compress import compress
from compress_export.pipeline.config import CompressionConfig


def weighted_error(D, H):
    return float(torch.einsum("oi,ij,oj->", D.double(), H.double(), D.double()))


def test_a_low_rank_error_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    X = torch.randn(200, 24, generator=g, dtype=torch.float64)
    for H in (None, X.T @ X):
        A, B = lowrank_correction(E, H, 3)
        assert A.shape == (3, 24) and B.shape == (40, 3)
        assert torch.allclose((B @ A).double(), E, atol=1e-4)


def test_weighted_correction_is_the_optimum_a_cholesky_derivation_gives():
    """Independent route to the same optimum: with H = L Lᵀ (Cholesky), ‖(E − BA)L‖_F is minimised by the truncated
    SVD of E·L mapped back by L⁻¹. EoRA (through H's eigenvectors) must reach that error, and beat the plain SVD of
    E in the inputs' metric; without H it is the plain truncated SVD."""
    g = torch.Generator().manual_seed(1)
    E = torch.randn(48, 32, generator=g, dtype=torch.float64)
    X = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.logspace(0, 1.5, 32, dtype=torch.float64)
    H = X.T @ X
    r = 6
    L = torch.linalg.cholesky(H)
    U, S, Vh = torch.linalg.svd(E @ L, full_matrices=False)
    best = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(L)
    A, B = lowrank_correction(E, H, r)
    ours = weighted_error(E - (B @ A).double(), H)
    assert ours == pytest.approx(weighted_error(E - best, H), rel=1e-4)
    A0, B0 = lowrank_correction(E, None, r)
    assert ours < 0.9 * weighted_error(E - (B0 @ A0).double(), H)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    assert torch.allclose((B0 @ A0).double(), (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-4)


def test_rank_larger_than_a_linear_is_refused_before_any_weight(tiny_model, tiny_text, tmp_path):
    with pytest.raises(UserError, match=r"--lowrank-rank 100 exceeds model\.layers\.0\..*use at most"):
        compress(tiny_model, tmp_path / "x", CompressionConfig(method="rtn", lowrank_rank=100), progress=False)
    assert not (tmp_path / "x").exists()


def test_lowrank_export_is_a_peft_adapter_our_loader_applies(tiny_model, tiny_text, tmp_path):
    """GPTQ W2 + rank 8: the adapter holds exactly the in-memory corrections (fp16, lora_alpha = r), every linear
    has one, and our loader's model equals the uncorrected one with each weight replaced by Q + B·A by hand."""
    from compress_export.io.loading import load_model, read_quantized

    results, on_result = recorder()
    out = tmp_path / "w2r8"
    cfg = CompressionConfig(
        method="gptq", bits=2, group_size=32, lowrank_rank=8, dataset=str(tiny_text), num_samples=8, seq_len=32
    )
    s = compress(tiny_model, out, cfg, progress=False, on_result=on_result)
    assert s.lowrank_rank == 8 and any("low-rank correction: rank 8" in ln for ln in s.lines())
    acfg, factors = read_adapter(out / "lowrank")
    raw = json.loads((out / "lowrank" / "adapter_config.json").read_text())
    assert (raw["peft_type"], raw["r"], raw["lora_alpha"]) == ("LORA", 8, 8)
    assert set(raw["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sorted(factors) == sorted(results)
    for name, qw in results.items():
        A, B = factors[name]
        assert A.dtype == torch.float16 and A.shape == (8, qw.shape[1]) and B.shape == (qw.shape[0], 8)
        assert torch.equal(A.float(), qw.lora_a) and torch.equal(B.float(), qw.lora_b)
    corrected, tok = load_model(out)
    plain, _ = load_model(out, lowrank=False)
    _, qweights, _ = read_quantized(out)
    with torch.no_grad():
        for name, qw in qweights.items():
            A, B = factors[name]
            plain.get_submodule(name).weight.copy_(qw.dequantize() + B.float() @ A.float())
    ids = tok(tiny_text.read_text(), return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        a, b = corrected(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    from compress_export import AutoCompressedModelForCausalLM

    hf = AutoCompressedModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, a, atol=1e-4)
    hf.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "lowrank" / "adapter_model.safetensors").is_file()
    from compress_export.pipeline.convert import convert

    ct = convert(out, "compressed-tensors", str(tmp_path / "ct"))
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (ct / "lowrank" / f).read_bytes() == (out / "lowrank" / f).read_bytes()


def test_rtn_correction_is_the_plain_svd_of_each_error(tmp_path):
    """RTN has no activation statistics: each linear's correction is the truncated SVD of W − Q (fp16-rounded)."""
    model = make_tiny_llama(tmp_path / "m", hidden=64, inter=128)
    results, on_result = recorder()
    compress(
        model,
        tmp_path / "o",
        CompressionConfig(method="rtn", bits=2, group_size=32, lowrank_rank=16),
        progress=False,
        on_result=on_result,
    )
    from compress_export.io.loading import load_model

    base, _ = load_model(model)
    for name, qw in results.items():
        E = base.get_submodule(name).weight.detach().double() - qw.dequantize().double()
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        best = (U[:, :16] * S[:16]) @ Vh[:16]
        assert torch.allclose((qw.lora_b @ qw.lora_a).double(), best, atol=2e-3 * float(E.abs().max())), name


def test_gptq_correction_uses_the_hessian_of_the_linears_own_inputs(tmp_path, tiny_text):
    """Layer 0's q_proj reads the normed embeddings, which compression does not change: recomputing its Hessian
    here from the calibration tokens, EoRA of W − Q must give the correction the pipeline wrote."""
    from compress_export.io.loading import load_model

    model = make_tiny_llama(tmp_path / "m", hidden=64, inter=128)
    results, on_result = recorder()
    compress(
        model,
        tmp_path / "o",
        CompressionConfig(
            method="gptq", bits=2, group_size=32, lowrank_rank=8, dataset=str(tiny_text), num_samples=4, seq_len=32
        ),
        progress=False,
        on_result=on_result,
    )
    base, tok = load_model(model)
    ids = tok(tiny_text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0][:128]
    seen = []
    q = base.model.layers[0].self_attn.q_proj
    hook = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        base(input_ids=ids.view(4, 32))
    hook.remove()
    X = seen[0]
    qw = results["model.layers.0.self_attn.q_proj"]
    E = q.weight.detach().double() - qw.dequantize().double()
    A, B = lowrank_correction(E, X.T @ X, 8)
    ours = (qw.lora_b @ qw.lora_a).double()
    assert torch.allclose(ours, (B @ A).double(), atol=2e-3 * float(ours.abs().max()))
    A0, B0 = lowrank_correction(E, None, 8)  # the unweighted one differs: the check can fail
    assert not torch.allclose(ours, (B0 @ A0).double(), atol=2e-3 * float(ours.abs().max()))


def test_serve_adds_the_adapter_unless_the_user_set_lora_flags(tmp_path):
    from compress_export.integrations.vllm_launch import lora_args

    (tmp_path / "lowrank").mkdir()
    (tmp_path / "lowrank" / "adapter_config.json").write_text(json.dumps({"r": 48}))
    args = lora_args(str(tmp_path), ["--port", "8000"])
    assert args == [
        "--enable-lora",
        "--lora-modules",
        f"corr={tmp_path.resolve() / 'lowrank'}",
        "--max-lora-rank",
        "64",
    ]
    assert lora_args(str(tmp_path), ["--enable-lora"]) == []
    assert lora_args(str(tmp_path / "lowrank"), []) == []  # no adapter there


def test_a_fused_correction_is_never_also_a_lora_nor_silently_dropped(tmp_path, monkeypatch):
    """COMPRESS_EXPORT_LOWRANK=fused: our plugin's linears apply OUT/lowrank, so no path attaches it as a LoRA too
    (that would add it twice), an export vLLM runs without our plugin (no quantization_config) is refused rather
    than served uncorrected, and asking for the export without its correction is refused too."""
    from compress_export.integrations.vllm_launch import lora_args
    from compress_export.integrations.vllm_lowrank import check_no_lora, served_lora

    (tmp_path / "lowrank").mkdir()
    (tmp_path / "lowrank" / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert served_lora(tmp_path) == tmp_path / "lowrank" and served_lora(tmp_path, wanted=False) is None
    monkeypatch.setenv("COMPRESS_EXPORT_LOWRANK", "fused")
    with pytest.raises(UserError, match="has no quantization_config, so vLLM runs it without our plugin"):
        lora_args(str(tmp_path), [])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"bits": 4}}))
    assert lora_args(str(tmp_path), ["--port", "8000"]) == [] and served_lora(tmp_path) is None
    with pytest.raises(UserError, match="run this export without its correction"):
        served_lora(tmp_path, wanted=False)
    with pytest.raises(UserError, match="do not also attach"):
        lora_args(str(tmp_path), ["--enable-lora", "--lora-modules", "corr=x"])
    with pytest.raises(UserError, match="do not also attach"):
        check_no_lora(tmp_path / "lowrank")
    monkeypatch.setenv("COMPRESS_EXPORT_LOWRANK", "fuse")
    with pytest.raises(UserError, match="COMPRESS_EXPORT_LOWRANK=fuse is not one of lora, fused"):
        lora_args(str(tmp_path), [])


def test_fused_pair_gives_each_part_of_a_fused_linear_its_own_correction():
    """vLLM's qkv_proj with q and v corrected (ranks 2 and 3) and k not: one pair of matmuls with the stacked A and
    block-diagonal B equals each part's B·A·x on its own rows, computed separately, and zero on k's rows."""
    from compress_export.integrations.vllm_lowrank import fused_pair

    g = torch.Generator().manual_seed(0)
    aq, bq = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    av, bv = torch.randn(3, 6, generator=g), torch.randn(2, 3, generator=g)
    factors = {"model.layers.0.self_attn.q_proj": (aq, bq), "model.layers.0.self_attn.v_proj": (av, bv)}
    A, B = fused_pair(
        dict(factors), "model.layers.0.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"], [4, 2, 2], 6, torch.float64
    )
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = x @ A.t() @ B.t()
    assert A.shape == (5, 6) and B.shape == (8, 5)
    torch.testing.assert_close(y[:, :4], x @ aq.double().t() @ bq.double().t())
    assert torch.equal(y[:, 4:6], torch.zeros(5, 2, dtype=torch.float64))
    torch.testing.assert_close(y[:, 6:], x @ av.double().t() @ bv.double().t())
    # an unfused linear is its own single part, and the pair it used leaves `factors` (leftovers are reported);
    # one the adapter does not correct gets no pair
    left = dict(factors)
    A1, B1 = fused_pair(left, "model.layers.0.self_attn.q_proj", [], [4], 6, torch.float32)
    assert torch.equal(A1, aq) and torch.equal(B1, bq) and list(left) == ["model.layers.0.self_attn.v_proj"]
    assert fused_pair(left, "model.layers.0.self_attn.o_proj", [], [6], 6, torch.float32) is None
    # Phi-3: one checkpoint module (qkv_proj) that vLLM splits into 3 output parts is one pair over all its rows
    aqkv, bqkv = torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g)
    A3, B3 = fused_pair(
        {"model.layers.0.self_attn.qkv_proj": (aqkv, bqkv)},
        "model.layers.0.self_attn.qkv_proj",
        ["qkv_proj"],
        [4, 2, 2],
        6,
        torch.float32,
    )
    assert torch.equal(A3, aqkv) and torch.equal(B3, bqkv)
    with pytest.raises(ValueError, match="v_proj: the low-rank pair is"):
        fused_pair(
            dict(factors),
            "model.layers.0.self_attn.qkv_proj",
            ["q_proj", "k_proj", "v_proj"],
            [4, 2, 3],
            6,
            torch.float32,
        )


# the adapter folder is checked like the rest of the export ------------------------------------------------------


@pytest.fixture(scope="module")
def w4r8(tiny_model, tmp_path_factory):
    """An RTN W4 g32 export of the tiny Llama (hidden 64, MLP 128, k/v 32 outputs) with a rank-8 correction."""
    out = tmp_path_factory.mktemp("lowrank-check") / "w4r8"
    compress(tiny_model, out, CompressionConfig(method="rtn", bits=4, group_size=32, lowrank_rank=8), progress=False)
    return out


def with_adapter(src, dst, config=None, tensors=None):
    """A copy of the export at src with its adapter's config and/or tensors edited by the given functions."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    a = dst / "lowrank"
    if config:
        cfg = json.loads((a / "adapter_config.json").read_text())
        cfg = config(cfg) or cfg
        (a / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(a / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(a / "adapter_model.safetensors"))
    return dst


def refused_by_check(d) -> str:
    from compress_export.io.export_check import check_export

    with pytest.raises(UserError) as e:
        check_export(d)
    return str(e.value)


K_A = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
K_B = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"


def test_an_intact_adapter_passes(w4r8):
    from compress_export.io.export_check import check_export
    from compress_export.io.lowrank import adapter_rank

    check_export(w4r8)
    assert adapter_rank(w4r8 / "lowrank") == 8


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: [c], "is a list, not a JSON object"),
        (lambda c: c.pop("r") and None, "r is null, not a rank"),
        (lambda c: c.update(r=0), "r is 0, not a rank"),
        (lambda c: c.update(r="8"), 'r is "8", not a rank'),
        (lambda c: c.update(lora_alpha="eight"), 'lora_alpha is "eight", not a number'),
        (lambda c: c.update(target_modules=["q_proj", 3]), "target_modules is a list, not a module name"),
    ],
)
def test_a_bad_adapter_config_is_one_line_naming_file_and_field(edit, field, w4r8, tmp_path):
    from compress_export.io.lowrank import adapter_rank

    d = with_adapter(w4r8, tmp_path / "a", config=edit)
    f = d / "lowrank" / "adapter_config.json"
    msg = refused_by_check(d)
    assert str(f) in msg and field in msg, msg
    for reader in (adapter_rank, read_adapter):  # never AttributeError, KeyError or ZeroDivisionError
        with pytest.raises(UserError, match=field.split(",")[0]):
            reader(d / "lowrank")


def test_adapter_shapes_are_checked_against_the_linears(w4r8, tmp_path):
    d = with_adapter(w4r8, tmp_path / "a", tensors=lambda t: t.update({K_A: torch.zeros(8, 32, dtype=torch.float16)}))
    msg = refused_by_check(d)
    assert f"{K_A} has shape [8, 32]; rank 8 on a 32×64 linear needs [8, 64]" in msg, msg
    d = with_adapter(w4r8, tmp_path / "b", tensors=lambda t: t.update({K_B: torch.zeros(64, 8, dtype=torch.float16)}))
    assert f"{K_B} has shape [64, 8]; rank 8 on a 32×64 linear needs [32, 8]" in refused_by_check(d)
    d = with_adapter(w4r8, tmp_path / "c", tensors=lambda t: t.pop(K_B))
    assert "model.layers.0.self_attn.k_proj has lora_A only" in refused_by_check(d)
    d = with_adapter(
        w4r8,
        tmp_path / "d",
        tensors=lambda t: t.update({"base_model.model.model.layers.0.mlp.nope.lora_A.weight": torch.zeros(8, 64)}),
    )
    assert "corrects model.layers.0.mlp.nope, not a linear of this export" in refused_by_check(d)


def test_a_damaged_adapter_header_and_pickles_are_refused(w4r8, tmp_path):
    import shutil

    d = tmp_path / "h"
    shutil.copytree(w4r8, d)
    f = d / "lowrank" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])  # a truncated download
    assert str(f) in refused_by_check(d)
    d = tmp_path / "p"
    shutil.copytree(w4r8, d)
    (d / "lowrank" / "adapter_model.bin").write_bytes(b"\x80\x04 not loaded")
    msg = refused_by_check(d)
    assert "holds pickle files (adapter_model.bin)" in msg and "never loaded" in msg, msg


def test_nan_in_an_adapter_factor_is_named_when_read(w4r8, tmp_path):
    def poison(t):
        t[K_B] = t[K_B].clone()
        t[K_B][0, 0] = float("nan")

    d = with_adapter(w4r8, tmp_path / "n", tensors=poison)
    with pytest.raises(UserError, match=f"tensor {K_B} has NaN or Inf"):
        read_adapter(d / "lowrank")


def test_convert_copies_the_adapter_of_a_hub_cache_snapshot(w4r8, tmp_path):
    """A hub snapshot's files are links into the repository's blobs: the adapter's too."""
    import shutil

    from compress_export.pipeline.convert import convert

    repo = tmp_path / "models--someone--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    for f in sorted(w4r8.rglob("*")):
        rel = f.relative_to(w4r8)
        if f.is_dir():
            (snap / rel).mkdir(parents=True, exist_ok=True)
            continue
        blob = blobs / rel.as_posix().replace("/", "_")
        shutil.copyfile(f, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(blob)
    out = convert(snap, "awq", str(tmp_path / "awq"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        got = out / "lowrank" / name
        assert not got.is_symlink() and got.read_bytes() == (w4r8 / "lowrank" / name).read_bytes()
