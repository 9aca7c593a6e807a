"""GPTQ and the Hessian core against error bounds on a single layer."""

import logging

import pytest
import torch

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.math.hessian import HessianAccumulator, inverse_cholesky
from compress_export.math.quant import rtn_quantize
from compress_export.math.sweep import gptq_quantize


def correlated(n_tok, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tok, n // 4, generator=g)
    mix = torch.randn(n // 4, n, generator=g)
    return base @ mix + 0.1 * torch.randn(n_tok, n, generator=g)


def out_err(X, W, qw):
    return ((X @ (W - qw.dequantize()).T) ** 2).mean().item()


def test_accumulator_is_2xtx_over_n():
    X = torch.randn(100, 16)
    acc = HessianAccumulator(16)
    for chunk in X.split(30):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * X.T @ X / 100, rtol=1e-4, atol=1e-5)


def test_inverse_cholesky_factor():
    X = correlated(256, 32)
    H = 2 * X.T @ X / 256
    inv = inverse_cholesky(H, damp=0.01)
    lam = 0.01 * torch.diag(H).mean()
    Hinv = torch.linalg.inv(H.double() + lam * torch.eye(32, dtype=torch.float64))
    # float32 factorisation: error relative to the largest entry, not per entry
    assert torch.allclose((inv.U.T @ inv.U).double(), Hinv, rtol=1e-3, atol=1e-4 * Hinv.abs().max().item())
    assert torch.allclose(inv.U, torch.triu(inv.U))


def test_singular_hessian_gets_more_damping_and_a_warning(caplog):
    H = -torch.eye(8)  # negative definite: no damping of 1% fixes it
    H[0, 0] = 1.0
    with caplog.at_level(logging.WARNING):
        with pytest.raises(UserError, match="layers.3.mlp: its calibration Hessian stays singular.*--damp"):
            inverse_cholesky(H, damp=0.01, name="layers.3.mlp")
    with pytest.raises(UserError, match="layers.0.x: its calibration inputs hold NaN or Inf"):
        inverse_cholesky(torch.full((4, 4), float("nan")), name="layers.0.x")
    assert "layers.3.mlp" in caplog.text
    # rank-deficient but PSD: recovers with a warning, no crash
    x = torch.randn(4, 16)
    inv = inverse_cholesky(x.T @ x, damp=0.0, name="lowrank")
    assert torch.isfinite(inv.U).all() and inv.damp > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", ["none", "static", "group"])
def test_gptq_beats_rtn_on_output_error(bits, act_order):
    X = correlated(2048, 128)
    acc = HessianAccumulator(128)
    acc.add(X)
    W = torch.randn(48, 128) * 0.05
    scheme = Scheme(bits, 32, True, act_order)
    qg = gptq_quantize(W, acc.H, scheme)
    qr = rtn_quantize(W, scheme)
    assert qg.codes.max() <= scheme.maxq and qg.codes.dtype == torch.uint8
    assert out_err(X, W, qg) < 0.8 * out_err(X, W, qr)
    if bits == 8:  # 8-bit is nearly lossless: relative output error far below 1e-4
        assert out_err(X, W, qg) / (X @ W.T).pow(2).mean().item() < 1e-4


def test_group_act_order_records_g_idx_and_static_does_not():
    X = correlated(1024, 64, seed=1) * torch.linspace(0.1, 3, 64)
    acc = HessianAccumulator(64)
    acc.add(X)
    W = torch.randn(16, 64)
    qg = gptq_quantize(W, acc.H, Scheme(4, 16, True, "group"))
    qs = gptq_quantize(W, acc.H, Scheme(4, 16, True, "static"))
    assert not qg.has_trivial_g_idx()
    assert torch.bincount(qg.g_idx.long()).tolist() == [16] * 4  # every group keeps its size
    assert qs.has_trivial_g_idx()
    # the most active column (largest diag H) is visited first, so it is in group 0
    assert int(qg.g_idx[torch.argmax(torch.diag(acc.H))]) == 0


def test_dead_inputs_are_zeroed_and_per_channel_works():
    X = correlated(512, 64)
    X[:, 5] = 0
    acc = HessianAccumulator(64)
    acc.add(X)
    W = torch.randn(8, 64)
    qw = gptq_quantize(W, acc.H, Scheme(4, -1, False))
    assert qw.scales.shape == (8, 1)
    assert torch.allclose(qw.dequantize()[:, 5], torch.zeros(8), atol=float(qw.scales.max()))
