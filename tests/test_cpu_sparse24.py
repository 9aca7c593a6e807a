"""The 2:4 CPU kernel (`cpu-sparse24`): every instruction-set variant against a plain torch product with the dense
pruned weight, its expansion against the dense weight bit for bit, NaN propagation, the registry's choice, the exact
round trip of its weight, and a tiny exported model run through it."""

import pytest
import torch
from conftest import isa_variant

from compress_export.core.hardware import native_bf16
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import Scheme
from compress_export.core.sparsity import Sparsity, nm_mask
from compress_export.kernels import cpu_sparse24 as cs
from compress_export.kernels import cpu_wna16 as ck
from compress_export.kernels.base import KernelRequest, choose_kernel

needs_ext = pytest.mark.skipif(ck.extension() is None, reason=ck.extension_error())
ISAS = ck.extension().isas() if ck.extension() is not None else []
ROWS = [1, 2, 3, 4, 5, 16, 33]


def mask24(out_f, in_f, seed):
    return nm_mask(torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(seed)), 2, 4)


def float_weight(out_f, in_f, seed=0, dtype=torch.bfloat16) -> SparseWeight:
    """Values exact in `dtype`, so the kernel keeps them in it (float32: any float)."""
    g = torch.Generator().manual_seed(seed + 1)
    mask = mask24(out_f, in_f, seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype).float() * mask
    return SparseWeight(w, mask, Sparsity(2, 4))


def coded_weight(out_f, in_f, bits, group, seed=0) -> QuantizedWeight:
    """Asymmetric codes; pruned ones sit at their group's zero point (as our passes write them)."""
    g = torch.Generator().manual_seed(seed + 2)
    gs = in_f if group == -1 else group
    G = in_f // gs
    mask = mask24(out_f, in_f, seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (out_f, G), generator=g, dtype=torch.int32)
    scales = (torch.rand(out_f, G, generator=g) * 0.02 + 1e-3).half().float()
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    codes = torch.where(mask, codes, zeros[:, g_idx.long()].to(torch.uint8))
    return QuantizedWeight(codes, scales, zeros, g_idx, Scheme(bits, group, False), mask=mask)


def kernel(w, dtype=torch.float32):
    return cs.CpuSparse24Kernel(w, KernelRequest.for_weight(w, dtype, "cpu"))


def check_product(k, w, M, dtype, seed=0):
    """y against x @ W_dense.T in float64 from the same (dtype-rounded) x. Bound: fp32 sums of K/2 products
    (relative 1e-5 of Σ|x·w|), plus the output's rounding to bf16 (2^-8 of |y|), plus, where the prefill GEMM
    runs on bf16 tiles (bf16 activations on a CPU that multiplies bf16 natively: tiled_product), each weight's
    rounding to bf16 (2^-8 of Σ|x·w|: fp16 values and dequantized codes are not all bf16 numbers)."""
    x = torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
    wd = w.dequantize(torch.float64)
    ref = x.double() @ wd.T
    y = k(x)
    assert y.dtype == dtype and y.shape == (M, w.shape[0])
    mass = x.double().abs() @ wd.abs().T
    bf16_tiles = dtype == torch.bfloat16 and native_bf16() and cs.use_gemm(M, w.shape[0] * w.shape[1])
    bound = 1e-5 * mass + (2**-8 * ref.abs() if dtype == torch.bfloat16 else 0) + 1e-7
    bound = bound + (2**-8 * mass if bf16_tiles else 0)
    assert bool(((y.double() - ref).abs() <= bound).all()), float(((y.double() - ref).abs() - bound).max())


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values", [torch.bfloat16, torch.float16, torch.float32])
def test_float_values_every_isa(isa, dtype, values):
    w = float_weight(72, 192, seed=3, dtype=values)
    k = kernel(w, dtype)
    assert k.kind == {torch.bfloat16: cs.KIND_BF16, torch.float16: cs.KIND_F16, torch.float32: cs.KIND_F32}[values]
    with isa_variant(ck.extension(), isa):
        for M in ROWS:
            check_product(k, w, M, dtype, seed=M)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, -1), (3, 64), (2, 32)])
def test_codes_every_isa(isa, dtype, bits, group):
    w = coded_weight(40, 256, bits, group, seed=bits * group)
    k = kernel(w, dtype)
    with isa_variant(ck.extension(), isa):
        for M in ROWS:
            check_product(k, w, M, dtype, seed=M)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_expand_is_the_dense_weight_exactly(isa):
    for w in (float_weight(24, 96), float_weight(24, 96, dtype=torch.float32), coded_weight(24, 128, 4, 64)):
        k = kernel(w)
        with isa_variant(ck.extension(), isa):
            for out, ref in ((torch.empty(24, w.shape[1]), w.dequantize()), (None, w.dequantize(torch.bfloat16))):
                out = torch.empty(24, w.shape[1], dtype=ref.dtype) if out is None else out
                cs.expand(k.values, k.meta, k.scales, k.zeros, k.kind, k.group, 0, 24, out)
                assert torch.equal(out, ref)
            part = torch.empty(5, w.shape[1])  # a tile of rows
            cs.expand(k.values, k.meta, k.scales, k.zeros, k.kind, k.group, 7, 12, part)
            assert torch.equal(part, w.dequantize()[7:12])


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_input_gives_nan(isa, dtype):
    """The dense product multiplies pruned zeros with x too (0·inf, 0·NaN are NaN): no finite output may hide it."""
    for w in (float_weight(16, 64), coded_weight(16, 64, 4, 32)):
        k = kernel(w, dtype)
        x = torch.randn(3, 64).to(dtype)
        x[1, 5], x[2, 60] = float("nan"), float("inf")
        with isa_variant(ck.extension(), isa):
            y = k(x)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()


@needs_ext
def test_registry_chooses_it_for_24_on_the_cpu():
    w = float_weight(32, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert choose_kernel(KernelRequest.for_weight(w, dtype, "cpu")) is cs.CpuSparse24Kernel
    q = coded_weight(32, 64, 4, 32)
    req = KernelRequest.for_weight(q, torch.float32, "cpu")
    assert req.sparsity == "2:4"
    assert choose_kernel(req) is ck.CpuWNA16Kernel  # run_codes off: cpu-wna16 measured faster (see the class)
    ok, why = cs.CpuSparse24Kernel.can_implement(req)
    assert not ok and "cpu-wna16" in why
    try:
        cs.CpuSparse24Kernel.run_codes = True
        assert choose_kernel(req) is cs.CpuSparse24Kernel
    finally:
        cs.CpuSparse24Kernel.run_codes = False
    dense = SparseWeight(torch.randn(32, 64), torch.ones(32, 64, dtype=torch.bool), Sparsity(ratio=0.5))
    ok, why = cs.CpuSparse24Kernel.can_implement(KernelRequest.for_weight(dense, torch.float32, "cpu"))
    assert not ok and "2:4" in why
    ok, why = cs.CpuSparse24Kernel.can_implement(KernelRequest.for_weight(float_weight(32, 48), torch.float32, "cpu"))
    assert not ok and "multiple of 32" in why
    ok, why = cs.CpuSparse24Kernel.can_implement(KernelRequest.for_weight(w, torch.float32, "cuda"))
    assert not ok and "CPU" in why


def test_bad_mask_is_named():
    w = float_weight(8, 32)
    w.mask[0, :4] = True
    with pytest.raises(Exception, match="2 kept weights in every group of 4"):
        kernel(w)


@needs_ext
def test_weight_round_trip_is_exact():
    for w in (
        float_weight(16, 96),
        float_weight(16, 96, dtype=torch.float16),
        float_weight(16, 96, dtype=torch.float32),
    ):
        back = kernel(w).quantized_weight()
        assert isinstance(back, SparseWeight) and str(back.sparsity) == "2:4"
        assert torch.equal(back.values, w.values) and torch.equal(back.mask, w.mask)
    q = coded_weight(16, 128, 4, 64)
    back = kernel(q).quantized_weight()
    for f in ("codes", "scales", "zeros", "g_idx", "mask"):
        assert torch.equal(getattr(back, f), getattr(q, f)), f
    assert back.scheme == q.scheme
    # bytes read per weight: 1 bit of positions + half the values
    k = kernel(float_weight(16, 96))
    assert k.values.numel() * k.values.element_size() + k.meta.numel() == 16 * 96 * (1 + 1 / 8)


@needs_ext
def test_compiled_graph_calls_the_op_and_matches_the_dense_product():
    """Under torch.compile (vLLM's compiled mode) the traced graph calls the opaque `compress_export::cpu_sparse24`
    op, and its numbers are the dense pruned weight's product."""
    w = float_weight(32, 64)
    k = kernel(w)
    targets = []

    def record(gm, inputs):  # a backend that only notes which functions the traced graph calls
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(2, 64)
    y = torch.compile(lambda t: k(t), backend=record, fullgraph=True)(x)
    assert torch.ops.compress_export.cpu_sparse24 in targets
    assert torch.allclose(y, x @ w.values.float().T, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("scheme", [None, Scheme(4, 32, False)])
def test_tiny_export_runs_through_the_kernel(tiny_model, tiny_text, tmp_path, scheme):
    """A 2:4 (and 2:4 + W4) export of a tiny Llama, loaded with our kernels: the same logits as the in-memory
    pruned model (its dense weights)."""
    from compress_export.io.loading import load_model
    from compress_export.kernels.linear import QuantLinear
    from compress_export.pipeline.compress import compress

    out = tmp_path / "s24"
    compress(
        tiny_model, out, dataset=str(tiny_text), num_samples=4, seq_len=32, progress=False,
        method="magnitude", sparsity="2:4", scheme=scheme,
    )  # fmt: skip
    dense, _ = load_model(out)
    try:
        cs.CpuSparse24Kernel.run_codes = True
        kmodel, _ = load_model(out, mode="kernel")
    finally:
        cs.CpuSparse24Kernel.run_codes = False
    linears = [m for m in kmodel.modules() if isinstance(m, QuantLinear)]
    assert linears and all(isinstance(m.kernel, cs.CpuSparse24Kernel) for m in linears)
    ids = torch.randint(3, 60, (2, 16))
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits, kmodel(input_ids=ids).logits
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
        one = kmodel(input_ids=ids[:1, :3]).logits  # decode-sized calls take the sparse kernel itself
        assert torch.allclose(dense(input_ids=ids[:1, :3]).logits, one, atol=1e-4)
