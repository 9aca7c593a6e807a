"""Pruning: the one mask function, SparseGPT against magnitude and Wanda on a layer, the formats, the passes."""

import json

import pytest
import torch
from conftest import assert_written_as_computed, recorder

from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import Scheme
from compress_export.core.sparsity import Sparsity, mask_for, nm_mask, row_mask
from compress_export.formats.base import FORMATS
from compress_export.io.loading import load_model
from compress_export.kernels.base import KERNELS, KernelRequest, choose_kernel
from compress_export.math.scaling import quadratic_error
from compress_export.math.sweep import gptq_quantize
from compress_export.pipeline.compress import compress

S24 = Sparsity(2, 4)


def test_nm_mask_keeps_the_two_largest_of_every_four():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]
    g = torch.Generator().manual_seed(0)
    m = nm_mask(torch.rand(64, 128, generator=g), 2, 4)
    assert (m.reshape(64, 32, 4).sum(-1) == 2).all()


def test_row_mask_prunes_the_ratio_of_each_row():
    m = row_mask(torch.rand(16, 100), 0.5)
    assert (m.sum(1) == 50).all()


@pytest.mark.parametrize("text,ok", [("2:4", True), ("0.5", True), ("4:2", False), ("1.5", False), ("x", False)])
def test_sparsity_parse(text, ok):
    if ok:
        assert str(Sparsity.parse(text)) == text
    else:
        with pytest.raises(UserError, match="--sparsity"):
            Sparsity.parse(text)


def layer_problem(seed=0, rows=96, n=128):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4096, n // 8, generator=g)
    X = base.repeat_interleave(8, dim=1) + 0.3 * torch.randn(4096, n, generator=g)  # correlated inputs
    X *= torch.rand(n, generator=g) * 3
    W = torch.randn(rows, n, generator=g) * 0.05
    return W, 2 * X.T @ X / X.shape[0]


def test_sparsegpt_24_beats_wanda_and_magnitude_on_the_output_error():
    W, H = layer_problem()
    err = {}
    for name, scores in (("magnitude", W.abs()), ("wanda", W.abs() * torch.diag(H).sqrt()[None])):
        err[name] = quadratic_error(W - W * mask_for(scores, S24), H)
    sp = gptq_quantize(W, H, None, sparsity=S24)
    assert isinstance(sp, SparseWeight)
    assert (sp.values[~sp.mask] == 0).all() and (sp.mask.reshape(96, -1, 4).sum(-1) == 2).all()
    err["sparsegpt"] = quadratic_error(W - sp.values, H)
    assert err["sparsegpt"] < 0.5 * err["magnitude"] and err["sparsegpt"] < err["wanda"], err


def test_sparsegpt_unstructured_and_joint_quantization():
    W, H = layer_problem(seed=1)
    sp = gptq_quantize(W, H, None, sparsity=Sparsity(ratio=0.5))
    assert abs((~sp.mask).float().mean().item() - 0.5) < 0.02
    joint = gptq_quantize(W, H, Scheme(4, 32, False), sparsity=S24)
    assert isinstance(joint, QuantizedWeight) and joint.mask is not None
    D = joint.dequantize()
    assert (D[~joint.mask] == 0).all()
    magnitude_rtn = W * mask_for(W.abs(), S24)
    assert quadratic_error(W - D, H) < quadratic_error(W - magnitude_rtn, H)


@pytest.mark.parametrize("scheme", [None, Scheme(4, 32, True), Scheme(4, 32, False), Scheme(8, -1, True)])
def test_sparse24_format_round_trip_and_layout(scheme):
    W, H = layer_problem(seed=2, rows=64, n=128)
    w = gptq_quantize(W, H, scheme, sparsity=S24)
    w.bias = torch.randn(64)
    f = FORMATS.get("sparse24")()
    dt = torch.float32  # a write option, not state of the format
    t = f.pack(w, dt)
    qcfg = f.quantization_config(scheme, ["lm_head"], {}, dt)
    back = f.unpack(t, qcfg)
    assert torch.equal(back.mask, w.mask) and torch.equal(back.dequantize(), w.dequantize())
    for name, spec in f.tensor_layout(scheme, 128, 64, dt).items():
        assert tuple(t[name].shape) == spec.shape and t[name].dtype == spec.dtype, name
    kept = t["weight_values"] if scheme is None else t["weight_packed"]
    assert kept.numel() * kept.element_size() < W.numel() * 4 / 2 + 1


def test_sparse24_golden_positions():
    # row 0 keeps positions (1,3) then (0,2): 2-bit values 1,3,0,2 → bits 0b10_00_11_01 in word 0
    mask = torch.zeros(1, 32, dtype=torch.bool)
    mask[0, [1, 3, 4, 6]] = True
    for g in range(2, 8):
        mask[0, [4 * g, 4 * g + 1]] = True
    w = SparseWeight(torch.arange(32.0)[None] * mask, mask, S24)
    t = FORMATS.get("sparse24")().pack(w)
    assert int(t["weight_idx"][0, 0]) & 0xFF == 0b10_00_11_01
    assert t["weight_values"][0, :4].tolist() == [1.0, 3.0, 4.0, 6.0]


def test_dense_and_sparse_kernels_are_chosen_with_reasons():
    W, H = layer_problem(seed=3, rows=64, n=128)
    sp = gptq_quantize(W, H, None, sparsity=S24)
    req = KernelRequest.for_weight(sp, torch.float32, "cpu")
    # the compressed-form CPU kernel wins where the extension is built; dense is the fallback
    fast_ok, _ = KERNELS.get("cpu-sparse24").can_implement(req)
    assert req.sparsity == "2:4" and choose_kernel(req).name == ("cpu-sparse24" if fast_ok else "dense")
    x = torch.randn(3, 128)
    for name in ("dense", "cpu-sparse24") if fast_ok else ("dense",):
        kernel = KERNELS.get(name)(sp, req)
        assert torch.allclose(kernel(x), x @ sp.values.T, atol=1e-5), name
    ok, why = KERNELS.get("semi-structured-24").can_implement(req)
    assert not ok and "CUDA" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_kernel_matches_dense_on_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability ≥ 8.0")
    W, H = layer_problem(seed=4, rows=256, n=256)
    sp = gptq_quantize(W, H, None, sparsity=S24)
    req = KernelRequest.for_weight(sp, torch.float16, "cuda")
    kernel = choose_kernel(req)(sp, req)
    assert type(kernel).name == "semi-structured-24"
    x = torch.randn(5, 256, device="cuda", dtype=torch.float16)
    ref = x @ sp.values.to("cuda", torch.float16).T
    assert torch.allclose(kernel(x), ref, atol=2e-2, rtol=1e-2)


def run(model, text, out, **kw):
    return compress(model, out, dataset=str(text), num_samples=8, seq_len=32, progress=False, **kw)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_passes_into_sparse24_and_dense(tiny_model, tiny_text, tmp_path, method):
    results, on_result = recorder()
    s = run(tiny_model, tiny_text, tmp_path / "s24", method=method, sparsity="2:4", on_result=on_result)
    assert s.format == "sparse24" and s.sparsity == "2:4" and s.scheme is None
    assert_written_as_computed(tmp_path / "s24", results)
    model, _ = load_model(tmp_path / "s24")
    for name, w in results.items():
        assert (w.mask.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
        assert torch.equal(model.get_submodule(name).weight, w.dequantize().to(model.get_submodule(name).weight.dtype))
    run(tiny_model, tiny_text, tmp_path / "dense", method=method, sparsity="2:4", fmt="dense")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["compress_export_sparsity"]["sparsity"] == "2:4"
    dense, _ = load_model(tmp_path / "dense")  # plain transformers load: an ordinary model
    q = dense.model.layers[0].self_attn.q_proj.weight
    assert ((q.reshape(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_sparsegpt_24_with_4_bits_and_unstructured(tiny_model, tiny_text, tmp_path):
    s = run(tiny_model, tiny_text, tmp_path / "j", method="sparsegpt", sparsity="2:4", scheme=Scheme(4, 32, True))
    assert s.format == "sparse24" and s.scheme["bits"] == 4
    model, _ = load_model(tmp_path / "j")
    kmodel, _ = load_model(tmp_path / "j", mode="kernel")
    ids = torch.randint(3, 60, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, kmodel(input_ids=ids).logits, atol=1e-4)
    s = run(tiny_model, tiny_text, tmp_path / "u", method="sparsegpt", sparsity="0.5")
    assert s.format == "dense"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="sparsegpt", sparsity="0.5", fmt="sparse24"), "stores 2:4 sparsity"),
        (dict(method="sparsegpt", sparsity="2:4", fmt="gptq"), "stores quantized weights"),
        (dict(method="gptq", sparsity="2:4"), "needs a pruning method"),
        (dict(method="wanda"), "needs --sparsity"),
        (dict(method="sparsegpt", sparsity="2:4", fmt="dense", scheme=Scheme(4, 32)), "drop --bits"),
    ],
)
def test_bad_pruning_requests_fail_before_work(tiny_model, tiny_text, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        run(tiny_model, tiny_text, tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("scheme", [None, Scheme(4, 32, False)])
def test_transformers_from_pretrained_runs_our_sparse24(tiny_model, tiny_text, tmp_path, scheme):
    """After `import compress_export`, plain transformers loads the export through our registered quantizer."""
    from transformers import AutoModelForCausalLM

    from compress_export.kernels.linear import QuantLinear

    run(tiny_model, tiny_text, tmp_path / "s", method="sparsegpt", sparsity="2:4", scheme=scheme)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"), dtype=torch.float32)
    assert isinstance(hf.model.layers[0].mlp.down_proj, QuantLinear)
    ours, _ = load_model(tmp_path / "s")
    ids = torch.randint(3, 60, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-4)
