"""GGUF block types (llama.cpp's ggml quantizations) that hold a pass's result exactly, and their packing.

A GGUF quantized tensor of a linear W [out, in] is `out` rows of `in / 32` blocks; each block covers 32
consecutive input columns of one output row (so a group of 32 is a block) and is stored little-endian as:

  Q4_0  18 bytes: d fp16, then qs[16]: byte j = q[j] | q[j+16] << 4,  q in 0..15,   w = d · (q − 8)
  Q4_1  20 bytes: d fp16, m fp16, then qs[16] as Q4_0,               q in 0..15,   w = d · q + m
  Q8_0  34 bytes: d fp16, then q[32] int8,                          q in −128..127, w = d · q

Our codes c with scale s and zero point z mean w = s · (c − z), so:
  4-bit symmetric, group 32 (z = 8)      → Q4_0 with q = c, d = s: exact;
  4-bit asymmetric, group 32             → Q4_1 with q = c, d = s, m = −s·z: the codes and d exact, m rounded
                                           to fp16 (relative error ≤ 2⁻¹¹ of m, one rounding of the block offset);
  8-bit symmetric, group 32 (z = 128)    → Q8_0 with q = c − 128, d = s: exact.
Anything else (other group sizes, 2/3 bits, act-order's regrouped columns) has no GGUF block type that holds it
without requantizing, and `block_type` says why in one line.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme

BLOCK = 32  # weights per block in every type written here
# GGMLQuantizationType values (ggml.h), so this module needs no gguf import
Q4_0, Q4_1, Q8_0 = 2, 3, 8
TYPE_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}


def block_type(scheme: Optional[Scheme]) -> Tuple[Optional[int], str]:
    """(GGML type that holds this scheme's results exactly, "") or (None, the one-line reason there is none)."""
    if scheme is None:
        return None, "GGUF has no block type for pruned (sparse) float weights; write them with --format dense"
    if scheme.act_bits != 16:
        return None, "GGUF stores weights only; W8A8's int8 activations are not recorded (use --bits 8 alone)"
    if scheme.group_size != BLOCK:
        return None, f"GGUF's Q4_0/Q4_1/Q8_0 blocks are {BLOCK} weights; compress with --group-size {BLOCK}"
    if scheme.act_order == "group":
        return None, "GGUF blocks are consecutive columns; act-order's regrouped columns (g_idx) do not fit them"
    if scheme.bits == 4:
        return (Q4_0, "") if scheme.symmetric else (Q4_1, "")
    if scheme.bits == 8:
        if not scheme.symmetric:
            return None, "GGUF's 8-bit block type Q8_0 has no zero point; compress 8-bit symmetric"
        return Q8_0, ""
    return None, f"GGUF has no {scheme.bits}-bit block type that holds these codes exactly (4 and 8 bits do)"


def _blocks(t: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """[out, in] → [out, in/32, 32], the block view."""
    return t.reshape(out_f, in_f // BLOCK, BLOCK)


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """[out, nb] float → [out, nb, 2] uint8, fp16 little-endian."""
    return x.to(torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """[out, nb, 32] codes 0..15 → [out, nb, 16] bytes: low nibble q[j], high nibble q[j+16]."""
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).contiguous().numpy()


def pack_blocks(qw: QuantizedWeight, ggml_type: int) -> np.ndarray:
    """One linear's result as GGUF blocks: uint8 [out, in/32 · bytes per block], row-major (what
    gguf.GGUFWriter.add_tensor takes with raw_dtype=ggml_type). The result's group of column i is i // 32."""
    out_f, in_f = qw.codes.shape
    if in_f % BLOCK or qw.scales.shape[1] != in_f // BLOCK or not qw.has_trivial_g_idx():
        raise ValueError(f"a {out_f}×{in_f} result with {qw.scales.shape[1]} groups is not in blocks of {BLOCK}")
    codes = _blocks(qw.codes.int(), out_f, in_f)
    d = _f16_bytes(qw.scales.float())
    if ggml_type == Q4_0:
        parts = [d, _nibbles(codes)]
    elif ggml_type == Q4_1:
        m = -(qw.scales.float() * qw.zeros.float())
        parts = [d, _f16_bytes(m), _nibbles(codes)]
    elif ggml_type == Q8_0:
        q = (codes - qw.scheme.sym_zero).to(torch.int8).contiguous().numpy().view(np.uint8)
        parts = [d, q]
    else:
        raise ValueError(f"GGML type {ggml_type} is not one written here")
    return np.concatenate(parts, axis=-1).reshape(out_f, -1)


def check_scales(qw: QuantizedWeight) -> Optional[str]:
    """Why the scales do not survive GGUF's fp16 d (None: each is an fp16 number, so d holds it exactly)."""
    s = qw.scales.float()
    if not torch.equal(s.half().float(), s):
        worst = float((s.half().float() - s).abs().max())
        return f"its scales are not fp16 numbers (off by up to {worst:.3g} in fp16); GGUF's block scale is fp16"
    return None


def check_codes(qw: QuantizedWeight, ggml_type: int) -> Optional[str]:
    """Why this result does not fit the type's fixed zero point (None: it fits)."""
    if ggml_type in (Q4_0, Q8_0) and bool((qw.zeros != qw.scheme.sym_zero).any()):
        return f"{TYPE_NAMES[ggml_type]} fixes the zero point at {qw.scheme.sym_zero}; these codes have others"
    return None
