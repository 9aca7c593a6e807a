"""The fused low-rank correction kernel (kernels/lowrank.py, kernels/csrc/cpu_lowrank.c): every instruction-set
variant this CPU runs, and the torch path, against a plain torch computation per part, x·A_pᵀ·B_pᵀ in fp64 on
the stored factors; the 16-bit storage against the fp32 factors; NaN propagation; bad layouts refused.

Error bounds (u = the unit roundoff of the dtype named):
- kernel vs the fp64 reference on the same stored factors: fp32 sums over K then r terms, so at most
  (K + r)·u_fp32 of Σ|x||A||B| elementwise; we assert 2e-6 of that (K ≤ 1536 is 1.0e-4 worst case, random signs
  stay far below: we see ≤ 3e-8). Adding to y rounds once more: u_fp32 (2^-24, we allow 2^-23) or u_bf16 (2^-8)
  of |y|.
- fp16 storage vs the fp32 factors: each product a·b gains at most 2u + u² relative (u = 2^-11), so the correction
  is off by at most 2.01·u·Σ|x||A||B| elementwise (2^-8 for bf16 storage).
"""

import pytest
import torch
from conftest import isa_variant

from compress_export.kernels import cpu_wna16 as ck
from compress_export.kernels import lowrank as lk

needs_ext = pytest.mark.skipif(ck.extension() is None, reason=ck.extension_error())
ISAS = ck.extension().isas() if ck.extension() is not None else []


def parts_of(K, sizes, ranks, seed=0, scale=0.05):
    """(column, A_p [r, K], B_p [N_p, r]) fp32 blocks; a rank of 0 leaves that part uncorrected (no block)."""
    g = torch.Generator().manual_seed(seed)
    blocks, col = [], 0
    for n, r in zip(sizes, ranks):
        if r:
            blocks.append((col, torch.randn(r, K, generator=g) * scale, torch.randn(n, r, generator=g) * scale))
        col += n
    return blocks


def stored(f: lk.LowRankFactors):
    """The blocks as the kernel reads them, widened to fp64 (independent of the kernel's own views)."""
    A = f.A.view(f.factor_dtype).double()
    B = f.B.view(f.factor_dtype).double()
    out, off = [], 0
    for c, n, r0, r in f.parts.tolist():
        out.append((c, A[r0 : r0 + r], B[off : off + n * r].reshape(n, r)))
        off += n * r
    return out


def reference(x, y0, blocks):
    """y0 + x·A_pᵀ·B_pᵀ on each part's columns (fp64), and the elementwise scale Σ|x||A||B| of each correction."""
    y, scale = y0.double().clone(), torch.zeros_like(y0, dtype=torch.float64)
    for c, a, b in blocks:
        a, b, xd = a.double(), b.double(), x.double()
        y[:, c : c + b.shape[0]] += xd @ a.t() @ b.t()
        scale[:, c : c + b.shape[0]] = xd.abs() @ a.abs().t() @ b.abs().t()
    return y, scale


# SmolLM2's merged q/k/v (k uncorrected here), gate/up and down, and odd sizes that leave tails of every width
SHAPES = [
    (576, [576, 192, 192], [64, 0, 64]),
    (576, [1536, 1536], [64, 64]),
    (1536, [576], [64]),
    (100, [37, 5, 20], [3, 16, 9]),
]


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,sizes,ranks", SHAPES)
def test_every_variant_matches_a_plain_torch_product_per_part(K, sizes, ranks, dtype, isa, monkeypatch):
    monkeypatch.setattr(lk, "KERNEL_MAX_ROWS", 1 << 20)  # M = 17 runs the kernel too
    ext = ck.extension()
    with isa_variant(ext, isa):
        blocks = parts_of(K, sizes, ranks)
        f = lk.pack("model.layers.0.mlp.x", blocks, sum(sizes), K)
        assert f.factor_dtype == torch.float16
        for m in (1, 3, 4, 17):
            g = torch.Generator().manual_seed(m)
            x = torch.randn(m, K, generator=g).to(dtype)
            y0 = torch.randn(m, sum(sizes), generator=g).to(dtype)
            y = y0.clone()
            lk.apply_(x, y, f)
            ref, scale = reference(x, y0, stored(f))
            bound = 2e-6 * scale + (2.0**-8 if dtype == torch.bfloat16 else 2.0**-23) * ref.abs()
            assert (y.double() - ref).abs().le(bound + 1e-30).all(), (isa, m, ((y.double() - ref).abs() / scale).max())
            untouched = torch.ones(sum(sizes), dtype=torch.bool)
            for c, _, b in blocks:
                untouched[c : c + b.shape[0]] = False
            assert torch.equal(y[:, untouched], y0[:, untouched])  # the uncorrected part is never written


@needs_ext
@pytest.mark.parametrize("K,sizes,ranks", SHAPES[:2])
def test_fp16_storage_is_within_its_rounding_of_the_fp32_factors(K, sizes, ranks):
    blocks = parts_of(K, sizes, ranks, seed=3)
    f = lk.pack("q", blocks, sum(sizes), K)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(4, sum(sizes))
    lk.apply_(x, y, f)
    exact, scale = reference(x, torch.zeros(4, sum(sizes)), blocks)  # the fp32 factors, not the stored ones
    err = (y.double() - exact).abs()
    assert err.le(2.01 * 2.0**-11 * scale + 2e-6 * scale + 1e-30).all()
    assert err.max() > 0  # it is the fp16 rounding being bounded, not an fp32 copy


def test_bf16_storage_only_where_fp16_overflows():
    blocks = parts_of(64, [16], [8])
    blocks[0][2][3, 1] = 1e5  # beyond fp16's 65504
    f = lk.pack("o", blocks, 16, 64)
    assert f.factor_dtype == torch.bfloat16
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(2, 16)
    lk.apply_(x, y, f)
    exact, scale = reference(x, torch.zeros(2, 16), blocks)
    assert (y.double() - exact).abs().le(2.01 * 2.0**-8 * scale + 2e-6 * scale).all()


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_reach_every_corrected_output_of_their_row(isa):
    ext = ck.extension()
    with isa_variant(ext, isa):
        K, sizes, ranks = SHAPES[0]
        f = lk.pack("qkv", parts_of(K, sizes, ranks), sum(sizes), K)
        for bad in (float("nan"), float("inf")):
            x = torch.randn(3, K)
            x[1, 7] = bad
            y = torch.zeros(3, sum(sizes))
            lk.apply_(x, y, f)
            corrected = torch.cat([torch.arange(0, 576), torch.arange(768, 960)])
            assert not torch.isfinite(y[1, corrected]).any()  # Inf·(±a)·(±b) sums to NaN or Inf, never finite
            assert torch.isfinite(y[[0, 2]]).all() and torch.equal(y[1, 576:768], torch.zeros(192))


def test_prefill_takes_the_torch_path_with_the_same_numbers():
    K, sizes, ranks = SHAPES[3]
    f = lk.pack("gate_up", parts_of(K, sizes, ranks), sum(sizes), K)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(40, K).to(dtype)
        y0 = torch.randn(40, sum(sizes)).to(dtype)
        y = y0.clone()
        assert not lk.uses_kernel(x, y)
        lk.apply_(x, y, f)
        ref, scale = reference(x, y0, stored(f))
        bound = 2e-6 * scale + (2.0**-23 if dtype == torch.float32 else 2.0**-8) * ref.abs()
        assert (y.double() - ref).abs().le(bound + 1e-30).all(), dtype


def test_add_correction_keeps_leading_dims_and_runs_as_a_custom_op():
    K, sizes, ranks = SHAPES[3]
    f = lk.pack("x", parts_of(K, sizes, ranks), sum(sizes), K)
    x = torch.randn(2, 3, K)
    y0 = torch.randn(2, 3, sum(sizes))
    out = f.add_to(x, y0.clone())
    ref, _ = reference(x.reshape(6, K), y0.reshape(6, -1), stored(f))
    assert out.shape == (2, 3, sum(sizes))
    torch.testing.assert_close(out.reshape(6, -1).double(), ref, rtol=1e-5, atol=1e-5)
    y = y0.reshape(6, -1).clone()
    torch.ops.compress_export.lowrank_apply(x.reshape(6, K), y, f.A, f.B, f.parts, f.bf16)
    torch.testing.assert_close(y, out.reshape(6, -1))


def test_bad_factors_and_layouts_are_refused_with_the_layer_named():
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    with pytest.raises(ValueError, match="layers.3.mlp.down_proj: the low-rank part at column 0 has NaN"):
        lk.pack("layers.3.mlp.down_proj", [(0, a, b * float("nan"))], 6, 8)
    with pytest.raises(ValueError, match="down_proj: low-rank part at column 2 overlaps"):
        lk.pack("down_proj", [(0, a, b), (2, a, b)], 12, 8)
    with pytest.raises(ValueError, match=r"not \[N, r\] · \[r, 9\]"):
        lk.pack("down_proj", [(0, a, b)], 6, 9)
    f = lk.pack("o", [(0, a, b)], 6, 8)
    with pytest.raises(ValueError, match="applied to x"):
        lk.apply_(torch.randn(1, 7), torch.zeros(1, 6), f)


@needs_ext
def test_the_extension_checks_the_part_table_itself():
    ext = ck.extension()
    A = torch.zeros(4, 8, dtype=torch.int16)
    B = torch.zeros(24, dtype=torch.int16)
    x, y = torch.zeros(1, 8), torch.zeros(1, 6)
    for parts, match in [
        ([[0, 6, 0, 4]], None),
        ([[0, 6, 1, 4]], "rank rows lie outside A"),
        ([[2, 6, 0, 4]], "inside y"),
        ([[0, 5, 0, 4]], "Σ N_p·r_p"),
    ]:
        p = torch.tensor(parts, dtype=torch.int64)
        call = (1, 8, 6, 4, x.data_ptr(), 0, y.data_ptr(), 0, A.data_ptr(), B.data_ptr(), 24, p.data_ptr(), 1, 0, 1)
        if match is None:
            ext.lowrank_apply(*call)
        else:
            with pytest.raises(ValueError, match=match):
                ext.lowrank_apply(*call)


def test_the_plugin_layout_equals_the_block_diagonal_pair():
    """integrations/vllm_lowrank: q and v of a merged qkv corrected, k not; the kernel's layout (no zero blocks)
    gives what the stacked A and block-diagonal B give."""
    from compress_export.integrations.vllm_lowrank import fused_factors, fused_pair

    g = torch.Generator().manual_seed(0)

    def h(*shape):  # fp16 values, as the export stores them: the kernel's fp16 copy is then exact
        return torch.randn(*shape, generator=g).half().float()

    factors = {
        "model.layers.0.self_attn.q_proj": (h(8, 32), h(16, 8)),
        "model.layers.0.self_attn.v_proj": (h(4, 32), h(8, 4)),
    }
    args = ("model.layers.0.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"], [16, 8, 8], 32)
    left = dict(factors)
    f = fused_factors(left, *args)
    assert not left and f.parts.tolist() == [[0, 16, 0, 8], [24, 8, 8, 4]] and f.B.numel() == 16 * 8 + 8 * 4
    A, B = fused_pair(dict(factors), *args, torch.float64)
    x = torch.randn(3, 32, generator=g)
    y = torch.zeros(3, 32)
    lk.apply_(x, y, f)
    torch.testing.assert_close(y.double(), x.double() @ A.t() @ B.t(), rtol=1e-5, atol=1e-5)
    assert fused_factors({}, *args) is None
