"""The fast CPU kernel (`cpu-wna16`) against the portable kernel and against hand-worked facts, on random shapes,
bit widths, group sizes, zero points and act-order, in both of its code paths (the CPU's own and portable C)."""

import shutil

import pytest
import torch
from conftest import isa_variant

from compress_export.core import settings
from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme
from compress_export.kernels import cpu_wna16 as ck
from compress_export.kernels.base import KernelRequest, choose_kernel
from compress_export.kernels.torch_dequant import TorchDequantKernel

needs_ext = pytest.mark.skipif(ck.extension() is None, reason=ck.extension_error())


@pytest.fixture(autouse=True, params=["int8", "float"])
def prefill(request, monkeypatch):
    """Every check on both prefill paths: W4A8 (the default, within tolerance()) and the exact float one."""
    monkeypatch.setenv("COMPRESS_EXPORT_PREFILL", request.param)
    return request.param


def random_qw(out_f, in_f, bits, group, sym=True, act_order=False, seed=0, mask=None) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group == -1 else group
    G = in_f // gs
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, G, generator=g) * 0.02 + 1e-3).half().float()
    zeros = (
        torch.full((out_f, G), 2 ** (bits - 1), dtype=torch.int32)
        if sym
        else torch.randint(0, 2**bits, (out_f, G), generator=g, dtype=torch.int32)
    )
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    if mask is not None:  # pruned weights sit at their zero point
        codes = torch.where(mask, codes, zeros[:, g_idx.long()].to(torch.uint8))
    return QuantizedWeight(
        codes, scales, zeros, g_idx, Scheme(bits, group, sym, "group" if act_order else "none"), mask=mask
    )


def run_both(qw, x):
    req = KernelRequest.for_weight(qw, x.dtype, "cpu")
    fast = ck.CpuWNA16Kernel(qw, req)
    ref = TorchDequantKernel(qw, KernelRequest.for_weight(qw, torch.float64, "cpu"))
    return fast(x), ref(x.double())


CASES = [
    (4, 64, True, False),
    (4, 128, False, True),
    (4, -1, True, False),
    (3, 32, False, False),
    (2, 64, False, True),
    (8, 64, True, False),
    (8, -1, False, True),
    (4, 256, False, False),
]


ISAS = ck.extension().isas() if ck.extension() is not None else []


def tolerance(bits: int, m: int) -> float:
    """Relative error allowed against the exact product: int16 activations round at 1.5e-5 of a block's largest
    value; the W4A8 prefill path's int8 activations at 4e-3 (its exact bound: tests/test_cpu_w4a8.py)."""
    return 2e-2 if bits <= 4 and ck.prefill_path(m) == "w4a8" else 1e-4


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,group,sym,act", CASES)
def test_matches_the_exact_product_on_every_variant(bits, group, sym, act, isa):
    ext = ck.extension()
    with isa_variant(ext, isa):
        for seed, (out_f, in_f) in enumerate([(96, 256), (40, 512), (200, 768)]):
            if group != -1 and in_f % group:
                continue
            qw = random_qw(out_f, in_f, bits, group, sym, act, seed)
            for m in (1, 3, 4, 5, 15, 16, 33, 130):  # both sides of the GEMM crossovers, every tile remainder
                x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m))
                y, ref = run_both(qw, x)
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                assert y.dtype == torch.float32 and err < tolerance(bits, m), (out_f, in_f, m, err)
                assert y.is_contiguous()  # vLLM splits fused q/k/v outputs by views


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations_within_their_own_rounding(dtype):
    qw = random_qw(128, 576, 4, 64, sym=False)
    for m in (1, 2, 3):  # 2 × m rows: the int16 path (W4A8 has its own bound in tests/test_cpu_w4a8.py)
        x = torch.randn(2, m, 576).to(dtype)
        y, ref = run_both(qw, x)
        assert y.dtype == dtype and y.shape == (2, m, 128)
        # the reference on the same rounded inputs; the output is rounded once to the activation dtype
        tol = 2 * torch.finfo(dtype).eps * ref.abs().max().item()
        assert (y.double() - ref).abs().max().item() <= tol


@needs_ext
@pytest.mark.parametrize("group", [32, 128, -1])
def test_error_within_the_int16_rounding_bound(group):
    """The only approximation is rounding x to int16 per block (B = the group, at most 256 columns; per-channel
    groups use blocks of 256/128/64/32): |y − exact| ≤ Σ_k |W[n, k]| · max|x_block| / 65534, plus fp32 sums."""
    qw = random_qw(64, 512, 4, group, sym=False, seed=11)
    x = torch.randn(3, 512) * torch.linspace(0.01, 5, 512)  # blocks of very different ranges
    y, exact = run_both(qw, x)
    B = 256 if group == -1 else group
    half_step = x.abs().view(3, -1, B).amax(-1).repeat_interleave(B, dim=1) / 65534  # [3, 512]
    bound = half_step.double() @ qw.dequantize(torch.float64).abs().T
    assert ((y.double() - exact).abs() <= bound + 1e-5 * exact.abs().max()).all()
    assert (y.double() - exact).abs().max() > 0  # it does round: the bound is what is being checked


@needs_ext
def test_act_order_permutes_x_not_the_result():
    qw = random_qw(64, 256, 4, 32, act_order=True, seed=3)
    x = torch.randn(2, 256)
    y, _ = run_both(qw, x)
    exact = x.double() @ qw.dequantize(torch.float64).T  # dequantize() reads g_idx column by column
    assert (y.double() - exact).abs().max() < 1e-4 * exact.abs().max()


@needs_ext
def test_pruned_24_codes_add_nothing():
    mask = torch.zeros(32, 128, dtype=torch.bool)
    mask.view(32, 32, 4)[..., :2] = True
    qw = random_qw(32, 128, 4, 64, sym=False, mask=mask, seed=5)
    x = torch.randn(3, 128)
    y, _ = run_both(qw, x)
    kept = x.double() @ (qw.dequantize(torch.float64) * mask).T
    assert (y.double() - kept).abs().max() < 1e-4 * kept.abs().max()


def test_packed_layout_by_hand():
    # codes k % 16 on one row of 64: chunk byte j holds column j (low) and 16 + j (high) → j | j << 4
    codes = (torch.arange(64) % 16).to(torch.uint8).view(1, 64)
    q = ck.pack_codes(codes, 4)
    assert q.shape == (1, 32) and q.dtype == torch.uint8
    assert q[0, :16].tolist() == [j | (j << 4) for j in range(16)] == q[0, 16:].tolist()
    codes = torch.tensor([[1] * 16 + [2] * 16])
    assert ck.pack_codes(codes, 4)[0].tolist() == [0x21] * 16


@needs_ext
@pytest.mark.parametrize("group,limit", [(32, 0.6), (64, 0.55), (128, 0.53)])
def test_weights_stay_packed(group, limit):
    qw = random_qw(256, 1024, 4, group)
    k = ck.CpuWNA16Kernel(qw, KernelRequest.for_weight(qw, torch.float32, "cpu"))
    nbytes = sum(t.numel() * t.element_size() for t in k.tensors().values())
    assert nbytes / (256 * 1024) <= limit


@needs_ext
def test_non_finite_activations_give_nan_rows_not_numbers():
    qw = random_qw(16, 128, 4, 64)
    x = torch.randn(3, 128)
    x[1, 5] = float("inf")
    x[2, 70] = float("nan")
    y, _ = run_both(qw, x)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isnan(y[2]).all()


@needs_ext
def test_bf16_in_and_out_is_the_fp32_result_rounded_once():
    """bf16 activations are widened and the result rounded inside the extension: the same numbers as the fp32 call
    on the widened input, rounded to nearest even by torch; NaN rows stay NaN."""
    qw = random_qw(72, 320, 4, 32, sym=False, seed=5)
    kernel = ck.CpuWNA16Kernel(qw, KernelRequest.for_weight(qw, torch.bfloat16, "cpu"))
    x = torch.randn(3, 320).bfloat16()
    x[2, 9] = float("nan")
    for m in (1, 2, 3):  # the int16 path (W4A8 starts at 8 rows)
        y16, y32 = kernel(x[:m]), kernel(x[:m].float())
        assert y16.dtype == torch.bfloat16
        assert torch.equal(y16[:2].view(torch.int16), y32[:2].bfloat16().view(torch.int16))
    assert torch.isnan(y16[2]).all()


@needs_ext
def test_registry_prefers_it_on_cpu_and_explains_refusals():
    qw = random_qw(64, 128, 4, 64)
    assert choose_kernel(KernelRequest.for_weight(qw, torch.float32, "cpu")) is ck.CpuWNA16Kernel
    for req, why in [
        (KernelRequest(4, 48, True, False, 96, 64, torch.float32, "cpu"), "multiple of 32 dividing"),
        (KernelRequest(4, 32, True, False, 80, 64, torch.float32, "cpu"), "not a multiple of 32"),
        (KernelRequest(4, 32, True, False, 64, 64, torch.float32, "cuda"), "runs on the CPU"),
    ]:
        ok, reason = ck.CpuWNA16Kernel.can_implement(req)
        assert not ok and why in reason


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_extension_is_built_where_a_compiler_exists():
    assert ck.extension() is not None, ck.extension_error()
    assert ck.isa() in ("generic", "avx2", "avxvnni", "avx512", "avx512vnni")
    if settings.get("CPU_ISA") == "auto":  # the best variant this CPU runs (a CI job may pin another)
        assert ck.isa() == ck.extension().isas()[-1]


@needs_ext
def test_compiled_graph_calls_the_same_kernel():
    """Under torch.compile (vLLM's compiled mode) the traced graph calls the opaque `compress_export::cpu_wna16` op,
    and that op's numbers are the exact float64 product with the dequantized weight (decode and prefill paths)."""
    qw = random_qw(64, 256, 4, 64, sym=False)
    k = ck.CpuWNA16Kernel(qw, KernelRequest.for_weight(qw, torch.float32, "cpu"))
    targets = []

    def record(gm, inputs):  # a backend that only notes which functions the traced graph calls
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(2, 256)  # 2 rows: the int16 kernel
    compiled = torch.compile(lambda t: k(t), backend=record, fullgraph=True)(x)
    assert torch.ops.compress_export.cpu_wna16 in targets
    x40 = torch.randn(40, 256)  # 40 rows: the W4A8 kernel
    op = torch.ops.compress_export.cpu_wna16(x40, k.qweight, k.scales, k.zeros, 4, 64, 64)
    for xi, y in ((x, compiled), (x40, op)):
        exact = xi.double() @ qw.dequantize(torch.float64).T
        tol = tolerance(4, xi.shape[0])
        assert y.shape == exact.shape and (y.double() - exact).abs().max() < tol * exact.abs().max()


@pytest.mark.parametrize("bits,group,sym,act", [(4, 64, False, True), (3, 32, True, False), (8, -1, False, False)])
def test_cuda_kernel_math_on_any_device(bits, group, sym, act):
    """The CUDA kernel's torch ops (what torch.compile fuses) run on the CPU too: both of its branches against the
    reference, on the CPU packer's layout."""
    from compress_export.kernels import cuda_wna16 as cw

    qw = random_qw(48, 256, bits, group, sym, act, seed=7)
    perm = torch.argsort(qw.g_idx.long(), stable=True)
    q = ck.pack_codes(qw.codes[:, perm], bits)
    assert torch.equal(ck.unpack_codes(q, bits), qw.codes[:, perm])
    gs = 256 if group == -1 else group
    for m in (1, cw.DECODE_ROWS + 3):
        x = torch.randn(m, 256, dtype=torch.float64)
        y = cw.linear(x[:, perm], q, qw.scales.half().view(torch.int16), qw.zeros, bits, gs)
        ref = x @ qw.dequantize(torch.float64).T
        assert (y - ref).abs().max() < 1e-9 * ref.abs().max() + 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_on_the_gpu():
    from compress_export.kernels import cuda_wna16 as cw

    qw = random_qw(512, 1024, 4, 128, sym=False, act_order=True)
    req = KernelRequest.for_weight(qw, torch.float16, "cuda")
    assert choose_kernel(req) is cw.CudaWNA16Kernel
    k = cw.CudaWNA16Kernel(qw, req)
    for m in (1, 4, 64):
        x = torch.randn(m, 1024, dtype=torch.float16, device="cuda")
        ref = x.double() @ qw.dequantize(torch.float64).cuda().T
        assert ((k(x).double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@needs_ext
def test_row_fillers_refuse_a_row_range_outside_the_matrix():
    """dequant, w4_dequant and sparse24_expand share one row-parallel loop (ce_fill_rows): a range past N, or
    reversed, is a ValueError before any byte is written."""
    ext, N, K = ck.extension(), 16, 64
    buf = torch.zeros(N, K)
    calls = {
        "dequant": lambda n0, n1: ext.dequant(8, N, K, 32, n0, n1, 0, 0, 0, buf.data_ptr(), 0, 1),
        "w4_dequant": lambda n0, n1: ext.w4_dequant(N, K, 32, n0, n1, 0, 0, 0, buf.data_ptr(), 0, 1),
        "sparse24_expand": lambda n0, n1: ext.sparse24_expand(0, N, K, 32, n0, n1, 0, 0, 0, 0, buf.data_ptr(), 0, 1),
    }
    for name, call in calls.items():
        for n0, n1 in ((0, N + 1), (5, 4), (-1, 2)):
            with pytest.raises(ValueError, match="row range out of bounds"):
                call(n0, n1)
        call(3, 3)  # an empty range touches nothing
    assert not buf.any()
