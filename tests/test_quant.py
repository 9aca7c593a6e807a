"""Single-function math checks: scales, zero points, clip search."""

import pytest
import torch

from compress_export.math.quant import dequantize, group_params, minmax_params, quantize, search_params


def test_symmetric_uses_fixed_zero_and_fp16_exact_scales():
    w = torch.randn(16, 64)
    s, z = minmax_params(w, 4, True)
    assert torch.all(z == 8)
    assert torch.equal(s, s.half().float())
    extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
    assert torch.equal(s, (extreme / -8).half().float())
    s8, z8 = minmax_params(w, 8, True)  # 8 bits: GPTQ's amax/127.5, positive
    assert torch.all(z8 == 128) and torch.equal(s8, (2 * w.abs().max(dim=1).values / 255).half().float())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_grid_holds_each_rows_extreme_exactly(bits):
    """By hand: the row [-0.3, 0.1, 0.8] at 4 bits has d = 0.8 / -8 = -0.1, codes 8 + round(w / d) = [11, 7, 0]
    and every value lands on the grid; in general the extreme (either sign) is reproduced to fp16 precision."""
    w = torch.tensor([[-0.3, 0.1, 0.8]])
    s, z = minmax_params(w, 4, True)
    q = quantize(w, s, z, 4)
    assert q.tolist() == [[11.0, 7.0, 0.0]]
    assert torch.allclose(dequantize(q, s, z.float()), w, atol=5e-4)  # d = -0.1 in fp16
    w = torch.randn(32, 64)
    w[::2] = -w[::2]
    s, z = minmax_params(w, bits, True)
    deq = dequantize(quantize(w, s, z, bits), s, z.float())
    idx = w.abs().argmax(dim=1, keepdim=True)
    assert torch.allclose(deq.gather(1, idx), w.gather(1, idx), rtol=2e-3)
    assert (s < 0).any() and (s > 0).any()


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
