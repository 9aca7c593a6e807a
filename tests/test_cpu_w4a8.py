"""The panel layout and its two integer paths (kernels/csrc/cpu_w4a8.c): the layout by hand and round trip, every
instruction-set variant this CPU runs against the portable C path, and the W4A8 prefill path against the exact
product within the bound that rounding x to int8 per block allows."""

import pytest
import torch
from conftest import ISA_IN_USE, isa_variant
from test_cpu_kernel import random_qw, run_both

from compress_export.kernels import cpu_wna16 as ck
from compress_export.kernels.base import KernelRequest

EXT = ck.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=ck.extension_error())
ISAS = EXT.isas() if EXT is not None else []
pytestmark = pytest.mark.usefixtures("int8_prefill")  # the default prefill, whatever conftest sets


def test_panel_layout_by_hand():
    # every output's codes are its column numbers 0..7: bytes 4i+2h+f hold columns 4f+h (low) and 4f+2+h (high)
    codes = torch.arange(8, dtype=torch.uint8).repeat(8, 1)
    q = ck.pack_panels(codes)
    assert q.shape == (1, 1, 32) and q.dtype == torch.uint8
    assert q[0, 0].tolist() == [0x20, 0x64, 0x31, 0x75] * 8
    # outputs are the lanes: output i's bytes are 4i..4i+3
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1).repeat(1, 8)
    assert ck.pack_panels(codes)[0, 0].tolist() == [i * 0x11 for i in range(8) for _ in range(4)]


@pytest.mark.parametrize("out_f,in_f", [(8, 8), (13, 64), (100, 96), (1, 32)])
def test_panel_round_trip_with_padding(out_f, in_f):
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8, generator=torch.Generator().manual_seed(out_f))
    codes.view(-1)[:16] = torch.arange(16, dtype=torch.uint8)[: codes.numel()] if codes.numel() >= 16 else 0
    q = ck.pack_panels(codes)
    assert q.shape == ((out_f + 7) // 8, in_f // 8, 32)
    assert torch.equal(ck.unpack_panels(q, out_f), codes)


def _kernel(qw, dtype=torch.float32):
    return ck.CpuWNA16Kernel(qw, KernelRequest.for_weight(qw, dtype, "cpu"))


@needs_ext
@pytest.mark.parametrize("isa", ISAS[1:] or ["generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_matches_the_portable_path(isa, dtype):
    """Same int16/int8 codes, exact integer sums: the variants differ from portable C only in fp32 rounding."""
    for bits, group, sym, act, out_f, in_f in [
        (4, 64, False, False, 100, 576),
        (3, 32, True, True, 24, 256),
        (4, -1, False, False, 8, 512),
        (2, 128, False, False, 40, 384),
    ]:
        qw = random_qw(out_f, in_f, bits, group, sym, act, seed=out_f)
        k = _kernel(qw, dtype)
        for m in (1, 2, 3, 4, 5, 7, 8, 9, 13, 33):
            x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).to(dtype)
            with isa_variant(EXT, "generic"):
                ref = k(x)
            with isa_variant(EXT, isa):
                y = k(x)
            scale = ref.double().abs().max()
            tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            assert (y.double() - ref.double()).abs().max() <= tol * scale, (isa, bits, group, m)


def _block(group: int, in_f: int) -> int:
    g = in_f if group == -1 else group
    return g if g <= 128 else next(b for b in (128, 64, 32) if g % b == 0)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [32, 64, 256, -1])
def test_w4a8_within_the_int8_rounding_bound(isa, group):
    """Rounding x to int8 per block of B columns (the group, at most 128) moves each value by at most half a step,
    max|x_block| / 254: |y − exact| ≤ Σ_k |W[n, k]| · max|x_block(k)| / 254, plus fp32 sums."""
    in_f = 512
    qw = random_qw(72, in_f, 4, group, sym=False, seed=3)
    m = ck.W4A8_MIN_ROWS + 5
    x = torch.randn(m, in_f) * torch.linspace(0.01, 5, in_f)  # blocks of very different ranges
    with isa_variant(EXT, isa):
        y, exact = run_both(qw, x)
    assert ck.prefill_path(m) == "w4a8"
    B = _block(group, in_f)
    half_step = x.abs().view(m, -1, B).amax(-1).repeat_interleave(B, dim=1).double() / 254
    bound = half_step @ qw.dequantize(torch.float64).abs().T
    err = (y.double() - exact).abs()
    assert (err <= bound + 1e-5 * exact.abs().max()).all()
    assert err.max() > 1e-4 * exact.abs().max()  # it does round: the bound is what is being checked


@needs_ext
def test_prefill_float_setting_runs_the_exact_path(monkeypatch):
    qw = random_qw(40, 256, 4, 64, sym=False, act_order=True, seed=9)
    x = torch.randn(20, 256)
    monkeypatch.setenv("COMPRESS_EXPORT_PREFILL", "float")
    assert ck.prefill_path(20) == "float"
    y, exact = run_both(qw, x)
    assert (y.double() - exact).abs().max() < 1e-5 * exact.abs().max()


@needs_ext
def test_w4a8_non_finite_rows_are_nan():
    qw = random_qw(16, 128, 4, 64)
    x = torch.randn(ck.W4A8_MIN_ROWS + 1, 128)
    x[1, 5] = float("inf")
    x[2, 70] = float("nan")
    y = _kernel(qw)(x)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and torch.isfinite(y[[0, 3, 4]]).all()


@needs_ext
def test_a_variant_the_cpu_lacks_is_refused():
    missing = [v for v in ("avx2", "avxvnni", "avx512", "avx512vnni") if v not in ISAS]
    if not missing:
        pytest.skip("this CPU runs every variant")
    with pytest.raises(ValueError, match=missing[0]):
        EXT.set_isa(missing[0])
    assert EXT.isa() == ISA_IN_USE  # a refused switch changes nothing
    with pytest.raises(ValueError, match="unknown ISA"):
        EXT.set_isa("sse9")
