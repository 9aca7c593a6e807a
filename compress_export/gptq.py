"""GPTQ (Frantar et al. 2023) as a pure function: weight and Hessian in, QuantizedWeight out.

Rows are independent given H, so linears that share an input (q/k/v, gate/up) are quantized in one call on
their concatenated rows: one Hessian, one inverse, one column sweep.
"""
from __future__ import annotations

import math

import torch

from .hessian import inverse_cholesky
from .quant import group_params, quantize, search_params
from .result import QuantizedWeight
from .scheme import Scheme

DEFAULT_BLOCK = 128


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: Scheme,
    *,
    damp: float = 0.01,
    block_size: int = DEFAULT_BLOCK,
    clip_search: bool = True,
    min_zero: int = 0,
    name: str = "layer",
) -> QuantizedWeight:
    """Quantize W [out, in] column by column, feeding each column's error forward through H⁻¹.

    Lazy batch updates (Frantar et al. §3.2): errors of a block of columns are applied to the rest of the
    matrix in one matmul after the block; inside a block each column updates only the block's remainder.
    """
    W = W.detach().float().clone()
    rows, n = W.shape
    gs = n if scheme.group_size == -1 else scheme.group_size
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    perm = None
    if scheme.act_order != "none":
        perm = torch.argsort(torch.diag(H), descending=True)
    # Static and per-channel params are fixed from the whole (unpermuted) weight before any update.
    fixed = None
    if scheme.group_size == -1 or scheme.act_order == "static":
        fixed = group_params(W, scheme.bits, scheme.symmetric, scheme.group_size, clip_search, min_zero)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, damp, name).U
    # Keep every group inside one block so group params see the block's in-flight updates.
    block = block_size if scheme.group_size == -1 else gs * max(1, math.ceil(block_size / gs))

    codes = torch.zeros(rows, n, dtype=torch.uint8)
    G = n // gs
    scales = torch.zeros(rows, G)
    zeros = torch.zeros(rows, G, dtype=torch.int32)
    g_of = torch.arange(n) // gs if perm is None or scheme.act_order == "group" else perm // gs
    orig = perm if perm is not None else torch.arange(n)
    if fixed is not None:  # per-column params in visiting order, gathered once
        S_all, Z_all = fixed[0][:, g_of].t().contiguous(), fixed[1][:, g_of].t().float().contiguous()

    # Work on Wᵀ [in, rows]: a column of W is then a contiguous row, which makes the per-column rank-1
    # update ~2.5× faster than on strided columns (measured on 3072×128 blocks).
    Wt = W.t().contiguous()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = Wt[i1:i2]  # a view: updates land in Wt
        Err = torch.empty_like(W1)
        Ub = U[i1:i2, i1:i2]
        if fixed is not None:
            S1, Z1 = S_all[i1:i2], Z_all[i1:i2]
        else:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
        for i in range(i2 - i1):
            if fixed is None and (i1 + i) % gs == 0:
                # Group params from the weights as updated so far, including this block's in-flight updates.
                sg, zg = search_params(W1[i:i + gs].t(), scheme.bits, scheme.symmetric, clip_search, min_zero)
                g = (i1 + i) // gs
                scales[:, g], zeros[:, g] = sg, zg
                S1[i:i + gs], Z1[i:i + gs] = sg, zg.float()
            w, s_, z_ = W1[i], S1[i], Z1[i]
            q = torch.div(w, s_).round_().add_(z_).clamp_(0, scheme.maxq)
            err = Err[i]
            torch.sub(w, (q - z_).mul_(s_), out=err).div_(Ub[i, i])
            W1[i:].addr_(Ub[i, i:], err, alpha=-1.0)
            W1[i] = q  # column i is final: keep its codes in place of the weights
        codes[:, orig[i1:i2]] = W1.t().to(torch.uint8)
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err, alpha=-1.0)

    if fixed is not None:
        scales, zeros = fixed
    g_idx = torch.empty(n, dtype=torch.int32)
    g_idx[orig] = g_of.to(torch.int32)
    if scheme.act_order == "static" or scheme.group_size == -1:
        g_idx = (torch.arange(n) // gs).to(torch.int32)
    return QuantizedWeight(codes, scales.float(), zeros.int(), g_idx, scheme)


def rtn_quantize(W: torch.Tensor, scheme: Scheme, clip_search: bool = False, min_zero: int = 0) -> QuantizedWeight:
    """Round-to-nearest with min-max (optionally MSE-clipped) group params: the baseline."""
    W = W.detach().float()
    n = W.shape[1]
    s, z = group_params(W, scheme.bits, scheme.symmetric, scheme.group_size, clip_search, min_zero)
    gs = n if scheme.group_size == -1 else scheme.group_size
    g_idx = (torch.arange(n) // gs).to(torch.int32)
    codes = quantize(W, s[:, g_idx.long()], z[:, g_idx.long()].float(), scheme.bits).to(torch.uint8)
    return QuantizedWeight(codes, s.float(), z.int(), g_idx, scheme)
