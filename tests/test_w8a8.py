"""W8A8: the int8 kernel against hand-worked arithmetic, the int-quantized layout against the compressed-tensors
library, SmoothQuant's scales and fold, and the export end to end on the tiny Llama."""

import json
import shutil

import pytest
import torch
from conftest import ISA_IN_USE, assert_written_as_computed, isa_variant, make_tiny_llama, recorder

from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import PRESETS
from compress_export.core.structure import SMOOTH_MAPPINGS
from compress_export.formats.base import FORMATS
from compress_export.kernels import int8
from compress_export.kernels.base import KERNELS, KernelRequest, choose_kernel
from compress_export.modifiers.smoothing import Smoothing, smooth_scales
from compress_export.passes.sequential import run_layer
from compress_export.pipeline.compress import compress
from compress_export.pipeline.config import CompressionConfig

W8A8 = PRESETS["W8A8"]


def random_w8a8(out_f=48, in_f=64, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, 1, generator=g) * 0.01 + 1e-3).half().float()
    return QuantizedWeight(
        codes, scales, torch.full((out_f, 1), 128, dtype=torch.int32), torch.zeros(in_f, dtype=torch.int32), W8A8
    )


def test_int8_kernel_is_per_token_int8_times_per_channel_int8():
    """By hand in float64: s_x = max|x_row|/127, x_q = round(x/s_x), y = (x_q · (q−128)ᵀ) · s_x · s_w. An all-zero
    token stays exactly zero."""
    qw = random_w8a8()
    req = KernelRequest.for_weight(qw, torch.float32, "cpu")
    kernel = choose_kernel(req)(qw, req)
    assert type(kernel).__name__ == "Int8DynamicKernel"
    x = torch.randn(5, 64, dtype=torch.float64)
    x[2] = 0
    sx = x.abs().amax(dim=1, keepdim=True) / 127
    xq = torch.round(x / torch.where(sx > 0, sx, torch.ones_like(sx)))
    want = (xq @ (qw.codes.double() - 128).t()) * sx * qw.scales.double().t()
    got = kernel(x.float())
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], torch.zeros(48))
    back = kernel.quantized_weight()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)


def saturating_pair_sum(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What an AVX2 int8 GEMM without VNNI computes (vpmaddubsw): x shifted to u8 by +128, each adjacent pair of
    u8 × s8 products added in a saturating int16, minus 128·Σw. The model the exact kernel is tested against."""
    if xq.shape[1] % 2:  # a zero weight column pairs the odd one out and adds nothing
        xq, w = torch.nn.functional.pad(xq, (0, 1)), torch.nn.functional.pad(w, (0, 1))
    u = xq.long() + 128
    pairs = (u[:, None, :] * w.long()[None]).view(u.shape[0], w.shape[0], -1, 2).sum(-1).clamp(-32768, 32767)
    return pairs.sum(-1) - 128 * w.long().sum(1)[None]


@pytest.mark.skipif(int8.extension() is None, reason="the compiled int8 GEMM is not built (no C compiler)")
@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_compiled_int8_gemm_is_exact_where_a_saturating_pair_sum_is_not(isa):
    """Full-range int8 operands, every tile remainder (rows of x 1..5, weight rows not a multiple of 4, K not a
    multiple of 16): the compiled GEMM equals the integer product computed in float64 (exact below 2^53), and the
    operands are such that the saturating int16 pair sum differs, so this check can tell the two apart."""
    ext = int8.extension()
    with isa_variant(ext, isa):
        g = torch.Generator().manual_seed(0)
        for m, k, n in [(1, 576, 64), (2, 64, 7), (3, 577, 13), (5, 1536, 9), (33, 40, 4)]:
            xq = torch.randint(-128, 128, (m, k), generator=g).to(torch.int8)
            w = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
            want = xq.double() @ w.double().t()
            got = int8.int8_matmul(xq, w)
            assert got.dtype == torch.int32 and torch.equal(got.double(), want), (m, k, n)
            assert not torch.equal(saturating_pair_sum(xq, w).double(), want), (m, k, n)
    assert ext.isa() == ISA_IN_USE  # the session's variant is back


@pytest.mark.skipif(int8.extension() is None, reason="the compiled int8 GEMM is not built (no C compiler)")
@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_compiled_w8a8_linear_gives_the_torch_expressions_floats(isa):
    """The one-call CPU kernel (quantize per token, exact GEMM, both scales) against the torch expression it
    replaces: the same floats, bit for bit, including an all-zero token, a rounding tie (x/s = 2.5) and a token
    with NaN, whose outputs must be NaN."""
    ext = int8.extension()
    with isa_variant(ext, isa):
        qw = random_w8a8(out_f=37, in_f=70, seed=3)
        w = (qw.codes.int() - 128).to(torch.int8).contiguous()
        scale = qw.scales.float().view(1, -1).contiguous()
        x = torch.randn(6, 70, generator=torch.Generator().manual_seed(4)) * 3
        x[1] = 0
        x[2, :2] = torch.tensor([127.0, 2.5])  # s = 1: the tie rounds to even (2)
        x[3, 5] = float("nan")
        got, want = int8.w8a8_linear(x, w, scale), int8.w8a8_reference(x, w, scale)
        assert torch.isnan(got[3]).all() and torch.isnan(want[3]).all()
        keep = [0, 1, 2, 4, 5]
        assert torch.equal(got[keep], want[keep]) and torch.equal(got[1], torch.zeros(37))


def test_compiled_int8_gemm_is_built_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    assert int8.extension() is not None


def test_weight_only_kernels_refuse_int8_activations_by_name():
    req = KernelRequest.for_weight(random_w8a8(), torch.float32, "cpu")
    for name in ("torch-dequant", "cpu-wna16"):
        ok, why = KERNELS.get(name).can_implement(req)
        assert not ok and "int8" in why, (name, why)


def test_int_quantized_layout_is_what_the_library_decompresses():
    """compressed-tensors' own IntQuantizationCompressor rebuilds our dequantized weight exactly, and its config
    model validates ours (format int-quantized, dynamic per-token int8 input activations)."""
    naive = pytest.importorskip("compressed_tensors.compressors.naive_quantized.base")
    q = pytest.importorskip("compressed_tensors.quantization")
    f = FORMATS.get("compressed-tensors")()
    qw = random_w8a8(seed=4)
    qw.bias = torch.randn(48)
    state = f.pack(qw)
    assert state["weight"].dtype == torch.int8 and tuple(state["weight_scale"].shape) == (48, 1)
    assert torch.equal(state["weight"].int(), qw.codes.int() - 128)  # signed values, by hand
    qcfg = f.quantization_config(W8A8, ["lm_head"], {"method": "gptq"})
    parsed = q.QuantizationConfig.model_validate(
        {
            k: v
            for k, v in qcfg.items()
            if k not in ("compress_export", "quantizer", "version", "sparsity_config", "transform_config")
        }
    )
    group = parsed.config_groups["group_0"]
    assert parsed.format == "int-quantized" and group.input_activations.dynamic is True
    assert group.input_activations.strategy == "token" and group.weights.strategy == "channel"
    lib_state = {k: v for k, v in state.items() if k != "bias"}
    out = naive.IntQuantizationCompressor.decompress(lib_state, group)
    assert torch.equal(out["weight"].float(), qw.dequantize())
    back = f.unpack(state, qcfg)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)
    assert f.scheme_from_config(qcfg) == W8A8 and f.primary_tensor(qcfg) == "weight_scale"


def test_w8a8_scheme_and_format_errors_name_the_fix():
    with pytest.raises(UserError, match="drop those flags"):
        CompressionConfig(scheme="W8A8", bits=4).to_scheme()
    with pytest.raises(UserError, match="compressed-tensors"):
        FORMATS.get("gptq")().check(W8A8)
    assert CompressionConfig(scheme="W8A8").resolved_format() == "compressed-tensors"
    with pytest.raises(UserError, match="between 0 and 1"):
        CompressionConfig(scheme="W8A8", smoothquant=1.5)


def test_smooth_scales_hand_worked():
    """α = 0.5: s = sqrt(max|x|) / sqrt(max|w|) per channel; the weights' max runs over every balance linear."""
    act = torch.tensor([4.0, 1.0, 9.0])
    w1 = torch.tensor([[1.0, -4.0, 0.5], [0.5, 1.0, -1.0]])
    w2 = torch.tensor([[-0.25, 2.0, 4.0]])
    s = smooth_scales(act, [w1, w2], 0.5)
    assert torch.allclose(s, torch.tensor([2.0 / 1.0, 1.0 / 2.0, 3.0 / 2.0]))
    assert torch.allclose(smooth_scales(act, [w1, w2], 1.0), act)  # α = 1: all difficulty to the weights


@torch.no_grad()
def test_smoothing_keeps_the_layer_function_and_flattens_its_inputs(tmp_path):
    """Folded into a real Llama layer: the same output, a smaller spread of per-channel input ranges at q_proj."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_llama(tmp_path / "m")), dtype=torch.float32)
    layer = model.model.layers[0]
    hidden = torch.randn(2, 16, 64)
    hidden[..., 5] *= 30  # an outlier channel, as real activations have
    pos = torch.arange(16)[None]
    kw = {"position_embeddings": model.model.rotary_emb(hidden, pos), "attention_mask": None}
    ranges = []
    hook = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: ranges.append(a[0].abs().amax(dim=(0, 1))))
    before = run_layer(layer, hidden, kw)
    Smoothing(0.5, SMOOTH_MAPPINGS["llama"]).apply(layer, [(hidden, kw)])
    after = run_layer(layer, hidden, kw)
    hook.remove()
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    spread = [float(r.max() / r.median()) for r in (ranges[0], ranges[-1])]
    assert spread[1] < spread[0] / 2, spread


def test_smoothquant_is_on_by_default_for_w8a8_only_and_0_turns_it_off():
    w8a8, w4 = PRESETS["W8A8"], PRESETS["W4A16"]
    assert Smoothing.plan(None, w8a8, "gptq", "llama").alpha == 0.5
    assert Smoothing.plan(None, w8a8, "rtn", "qwen2").alpha == 0.5
    for args in (
        (0, w8a8, "gptq", "llama"),
        (None, w4, "gptq", "llama"),
        (None, w8a8, "awq", "llama"),
        (None, w8a8, "gptq", "gpt_neox"),
    ):
        assert Smoothing.plan(*args) is None, args
    with pytest.raises(UserError, match="no mappings for model_type 'gpt_neox'"):
        Smoothing.plan(0.5, w8a8, "gptq", "gpt_neox")


def test_smoothquant_errors_are_one_line_before_any_weight(tiny_model, tiny_text, tmp_path):
    for cfg, match in (
        (CompressionConfig(method="gptq", smoothquant=0.5), "W8A8"),
        (CompressionConfig(scheme="W8A8", method="awq", smoothquant=0.5), "rtn or gptq"),
    ):
        with pytest.raises(UserError, match=match):
            compress(tiny_model, tmp_path / "x", cfg.with_(dataset=str(tiny_text)), progress=False)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w8a8_export_with_smoothquant_end_to_end(tiny_model, tiny_text, tmp_path, method):
    """RTN and GPTQ W8A8 after SmoothQuant: the file holds exactly the in-memory results, the config records the
    scheme and α, the norms carry the folded scales, and our loader runs every linear in int8 close to the
    unquantized model."""
    from compress_export.io.loading import load_model

    results, on_result = recorder()
    out = tmp_path / method
    cfg = CompressionConfig(
        scheme="W8A8", method=method, smoothquant=0.5, dataset=str(tiny_text), num_samples=4, seq_len=32
    )
    compress(tiny_model, out, cfg, progress=False, on_result=on_result)
    assert_written_as_computed(out, results)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["compress_export"]["smoothquant"] == 0.5
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    model, tok = load_model(out)
    base, _ = load_model(tiny_model)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)
    kinds = {type(m.kernel).__name__ for m in model.modules() if hasattr(m, "kernel")}
    assert kinds == {"Int8DynamicKernel"} and len(results) == 14
    ids = tok(tiny_text.read_text(), return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    from compress_export import AutoCompressedModelForCausalLM

    hf = AutoCompressedModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert {type(m.kernel).__name__ for m in hf.modules() if hasattr(m, "kernel")} == {"Int8DynamicKernel"}
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, a, atol=1e-5)
