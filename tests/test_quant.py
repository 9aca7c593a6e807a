"""Single-function math checks: scales, zero points, clip search."""

import torch

from compress_export.math.quant import dequantize, group_params, minmax_params, quantize, search_params


def test_symmetric_uses_fixed_zero_and_fp16_exact_scales():
    w = torch.randn(16, 64)
    s, z = minmax_params(w, 4, True)
    assert torch.all(z == 8)
    assert torch.equal(s, s.half().float())
    amax = w.abs().max(dim=1).values
    assert torch.allclose(s, (2 * amax / 15).half().float(), rtol=1e-3)


def test_asymmetric_range_covers_min_and_max():
    w = torch.rand(8, 32) * 3 - 1
    s, z = minmax_params(w, 4, False)
    q = quantize(w, s, z, 4)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize(q, s, z.float()) - w).abs().max(dim=1).values
    assert torch.all(err <= s * 0.5 + 1e-6)


def test_min_zero_is_respected():
    w = torch.rand(4, 32)  # all positive: the natural zero is 0
    _, z = minmax_params(w, 4, False, min_zero=1)
    assert torch.all(z >= 1)


def test_clip_search_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(64, 64) * torch.rand(64, 1)
    w[0, 0] = 8.0  # an outlier makes min-max wasteful
    for bits, sym in [(2, True), (3, True), (4, False), (8, True)]:
        s0, z0 = search_params(w, bits, sym, search=False)
        s1, z1 = search_params(w, bits, sym, search=True)

        def err(s, z):
            return (dequantize(quantize(w, s, z, bits), s, z.float()) - w).abs().pow(2.4).sum(dim=1)

        assert torch.all(err(s1, z1) <= err(s0, z0) + 1e-6)
        assert err(s1, z1).sum() < err(s0, z0).sum()


def test_group_params_shape_and_independence():
    w = torch.randn(6, 128)
    s, z = group_params(w, 4, True, 32, search=False)
    assert s.shape == (6, 4) and z.shape == (6, 4)
    s2, _ = minmax_params(w[:, 32:64], 4, True)
    assert torch.equal(s[:, 1], s2)
