"""The one bit packer behind every format: integers as a little-endian bitstream in int32 words.

Along the packed dimension, value j occupies bits [bits·j, bits·j + bits) of the concatenated 32-bit words.
For 2/4/8 bits that is "value j at bit bits·(j mod 32/bits) of word j·bits/32"; for 3 bits it is AutoGPTQ's
three-words-per-32-values scheme, where values 10 and 21 straddle word boundaries. A format that stores values
in another order within a word (AWQ's interleave) passes that order as a permutation: `order[k]` is the
index, within each word's run of values, of the value stored at slot k.

`aligned=True` is the other layout engines use (compressed-tensors' pack-quantized): 32//bits whole values per
word and no value ever straddles two words (3-bit: 10 values per word, the top 2 bits unused); a dimension that
is not a multiple of 32//bits is zero-padded at its end.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def period(bits: int) -> int:
    """Values per repeating unit of whole words: 32/gcd(32, bits) values fill bits/gcd words exactly."""
    return 32 // math.gcd(32, bits)


def packed_len(n: int, bits: int) -> int:
    return n * bits // 32


def check_packable(n: int, bits: int, what: str = "dimension") -> None:
    p = period(bits)
    if n % p:
        raise ValueError(f"{what} of size {n} cannot be packed at {bits} bits: it must be a multiple of {p}")


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack(
    values: torch.Tensor, bits: int, dim: int, order: Optional[Sequence[int]] = None, aligned: bool = False
) -> torch.Tensor:
    """Pack integer `values` (each in [0, 2^bits)) along `dim` into int32 words."""
    v = values.movedim(dim, -1).to(torch.int64) & ((1 << bits) - 1)
    if aligned:
        return _pack_aligned(v, bits).movedim(-1, dim).contiguous()
    n = v.shape[-1]
    check_packable(n, bits)
    if order is not None:
        v = _apply_order(v, order, inverse=False)
    p = period(bits)
    words_per = p * bits // 32
    v = v.reshape(*v.shape[:-1], n // p, p)
    out = torch.zeros(*v.shape[:-1], words_per, dtype=torch.int64)
    for j in range(p):
        w, o = divmod(bits * j, 32)
        out[..., w] |= (v[..., j] << o) & 0xFFFFFFFF
        if o + bits > 32:
            out[..., w + 1] |= v[..., j] >> (32 - o)
    out = out.reshape(*out.shape[:-2], n * bits // 32)
    return _to_int32(out).movedim(-1, dim).contiguous()


def unpack(
    words: torch.Tensor,
    bits: int,
    dim: int,
    order: Optional[Sequence[int]] = None,
    aligned: bool = False,
    length: Optional[int] = None,
) -> torch.Tensor:
    """Inverse of `pack`: int32 words along `dim` back to values (int32) in [0, 2^bits).

    `length` (aligned only): the unpadded size of the packed dimension.
    """
    w64 = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if aligned:
        return _unpack_aligned(w64, bits, length).movedim(-1, dim).contiguous()
    p = period(bits)
    words_per = p * bits // 32
    m = w64.shape[-1]
    if m % words_per:
        raise ValueError(f"{m} packed words at {bits} bits: must be a multiple of {words_per}")
    w64 = w64.reshape(*w64.shape[:-1], m // words_per, words_per)
    mask = (1 << bits) - 1
    vals = []
    for j in range(p):
        w, o = divmod(bits * j, 32)
        v = w64[..., w] >> o
        if o + bits > 32:
            v = v | (w64[..., w + 1] << (32 - o))
        vals.append(v & mask)
    v = torch.stack(vals, dim=-1).reshape(*w64.shape[:-2], m // words_per * p)
    if order is not None:
        v = _apply_order(v, order, inverse=True)
    return v.to(torch.int32).movedim(-1, dim).contiguous()


def _apply_order(v: torch.Tensor, order: Sequence[int], inverse: bool) -> torch.Tensor:
    k = len(order)
    idx = torch.as_tensor(order, dtype=torch.long)
    if inverse:
        idx = torch.argsort(idx)
    shaped = v.reshape(*v.shape[:-1], v.shape[-1] // k, k)
    return shaped[..., idx].reshape(v.shape)


def aligned_len(n: int, bits: int) -> int:
    """Words for n values in the aligned layout."""
    per = 32 // bits
    return -(-n // per)


def _pack_aligned(v: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    n = v.shape[-1]
    v = torch.nn.functional.pad(v, (0, aligned_len(n, bits) * per - n))
    v = v.reshape(*v.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return _to_int32((v << shifts).sum(dim=-1))


def _unpack_aligned(w64: torch.Tensor, bits: int, length: Optional[int]) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = (w64[..., None] >> shifts) & ((1 << bits) - 1)
    v = v.reshape(*w64.shape[:-1], w64.shape[-1] * per)
    if length is not None:
        v = v[..., :length]
    return v.to(torch.int32)
