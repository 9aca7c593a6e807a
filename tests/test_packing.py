"""Exhaustive pack/unpack round trips and golden bytes: a layout change can never pass silently."""

import itertools

import pytest
import torch

from compress_export.formats.packing import pack, packed_len, period, unpack

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def reference_bitstream(values, bits):
    """Bit-by-bit reference: value j at stream bit bits*j, words little-endian, as unsigned ints."""
    n = len(values)
    words = [0] * (n * bits // 32)
    for j, v in enumerate(values):
        for b in range(bits):
            if (v >> b) & 1:
                pos = bits * j + b
                words[pos // 32] |= 1 << (pos % 32)
    return words


def as_unsigned(t):
    return [int(x) & 0xFFFFFFFF for x in t.tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_value_at_every_slot_round_trips(bits):
    p = period(bits)
    # every value at every position of a period, for many periods
    vals = torch.tensor([(v + s) % (1 << bits) for v in range(1 << bits) for s in range(p)], dtype=torch.int32)
    vals = vals[: len(vals) // p * p]
    packed = pack(vals[None], bits, dim=1)
    assert packed.dtype == torch.int32 and packed.shape == (1, packed_len(len(vals), bits))
    assert as_unsigned(packed[0]) == reference_bitstream(vals.tolist(), bits)
    assert torch.equal(unpack(packed, bits, dim=1)[0], vals)


@pytest.mark.parametrize(
    "bits,dim,shape", list(itertools.product([2, 3, 4, 8], [0, 1], [(96, 32), (32, 160), (64, 64)]))
)
def test_random_round_trip_along_either_dim(bits, dim, shape):
    g = torch.Generator().manual_seed(bits * 10 + dim)
    vals = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32)
    packed = pack(vals, bits, dim=dim)
    expect = list(shape)
    expect[dim] = shape[dim] * bits // 32
    assert list(packed.shape) == expect
    assert torch.equal(unpack(packed, bits, dim=dim), vals)


def test_gptq_4bit_golden_word():
    # values 0..7 along the packed dim land at nibbles 0..7: 0x76543210
    packed = pack(torch.arange(8, dtype=torch.int32)[:, None], 4, dim=0)
    assert packed.shape == (1, 1) and int(packed) == 0x76543210


def test_3bit_straddles_words_like_autogptq():
    # value 10 occupies stream bits 30..32: two low bits end word 0, the high bit starts word 1
    vals = torch.zeros(32, dtype=torch.int32)
    vals[10] = 0b111
    vals[21] = 0b101
    w = as_unsigned(pack(vals, 3, dim=0))
    assert w == [0b11 << 30, 0b1 | (0b1 << 31), 0b10]


def test_sign_bit_words_are_negative_int32():
    packed = pack(torch.full((8,), 15, dtype=torch.int32), 4, dim=0)
    assert int(packed[0]) == -1


def test_awq_order_is_a_permutation_on_the_same_packer():
    vals = torch.arange(8, dtype=torch.int32)
    packed = pack(vals, 4, dim=0, order=AWQ_ORDER)
    # nibble k holds column AWQ_ORDER[k]: 0,2,4,6,1,3,5,7 -> 0x75316420
    assert as_unsigned(packed) == [0x75316420]
    assert torch.equal(unpack(packed, 4, dim=0, order=AWQ_ORDER), vals)


def test_unpackable_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(16, dtype=torch.int32), 3, dim=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(12, dtype=torch.int32), 4, dim=0)


def reference_aligned(values, bits):
    """Word-aligned reference: 32//bits whole values per word, value j at bit bits·(j mod per), zero-padded."""
    per = 32 // bits
    words = [0] * -(-len(values) // per)
    for j, v in enumerate(values):
        words[j // per] |= v << (bits * (j % per))
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 10, 31, 32, 33, 576])
def test_aligned_layout_every_value_and_odd_lengths(bits, n):
    vals = torch.tensor([(7 * j + 3) % (1 << bits) for j in range(n)], dtype=torch.int32)
    packed = pack(vals[None], bits, dim=1, aligned=True)
    assert as_unsigned(packed[0]) == reference_aligned(vals.tolist(), bits)
    assert torch.equal(unpack(packed, bits, dim=1, aligned=True, length=n)[0], vals)
    # and along dim 0, as compressed-tensors packs zero points
    assert torch.equal(unpack(pack(vals[:, None], bits, 0, aligned=True), bits, 0, aligned=True, length=n)[:, 0], vals)


def test_aligned_3bit_golden_word():
    # ten 3-bit values per word, top two bits unused: 1..10 → Σ v_j << 3j, value 10 starts word 1
    w = as_unsigned(pack(torch.arange(1, 12, dtype=torch.int32)[None] % 8, 3, dim=1, aligned=True)[0])
    assert w == [sum(((j + 1) % 8) << (3 * j) for j in range(10)), (11 % 8)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_aligned_matches_compressed_tensors_packer(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    vals = torch.randint(0, 1 << bits, (12, 70), generator=g, dtype=torch.int32)
    signed = (vals - (1 << (bits - 1))).to(torch.int8)
    for dim in (0, 1):
        theirs = helpers.pack_to_int32(signed, bits, packed_dim=dim)
        assert torch.equal(pack(vals, bits, dim=dim, aligned=True), theirs)
