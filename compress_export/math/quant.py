"""Pure quantization math: tensors in, tensors out. No hooks, no modules."""

from __future__ import annotations

from typing import Any

import torch

from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme

# GPTQ's MSE clip search: shrink the range by up to 20% in 1% steps; the error norm 2.4 weights large
# errors more than L2 but less than max-abs, which tracks perplexity better than either (Frantar et al.).
CLIP_GRID = 100
CLIP_MAX_SHRINK = 0.20
CLIP_NORM = 2.4
WEIGHTED_CHUNK = 1 << 24  # elements of w per slice of weighted_group_params (64 MB in float32)


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (float32) and keep it away from zero, sign kept (zero counts as positive):
    a symmetric scale is negative where its group's extreme weight is positive (params_from_range)."""
    sign = torch.where(x < 0, -1.0, 1.0)
    a = x.abs().clamp(min=1e-8).half().float()
    return sign * a.clamp(min=float(torch.finfo(torch.float16).tiny))


def minmax_params(w: torch.Tensor, bits: int, symmetric: bool, clip: torch.Tensor | float = 1.0, min_zero: int = 0):
    """Scale and zero per row of w [rows, n] from the (shrunk) min-max range.

    Symmetric uses offset-binary codes with the fixed zero 2^(bits-1) (params_from_range says which scale).
    Returns scale float32 [rows], zero int32 [rows].
    """
    w = w.float()
    xmin = torch.minimum(w.min(dim=1).values, torch.zeros(()))
    xmax = torch.maximum(w.max(dim=1).values, torch.zeros(()))
    return params_from_range(xmin * clip, xmax * clip, bits, symmetric, min_zero)


def params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, min_zero: int = 0):
    """Scale (fp16-exact, float32) and zero (int32) for ranges [xmin, xmax] of any shape (xmin ≤ 0 ≤ xmax).

    Symmetric below 8 bits: the range's extreme (the end of larger magnitude, with its sign) is put exactly on
    the lowest code, scale = extreme / −2^(bits−1), negative where that extreme is positive (llama.cpp's Q4_0
    grid). The codes' 2^bits levels are asymmetric about zero (−8..7 steps at 4 bits), so GPTQ's convention,
    2·amax/(2^bits − 1), leaves both ends half a step off the grid and its step 1/15 coarser; an outlier
    weight is what a group can least afford to round. SmolLM2 RTN W4 g64, held-out text B: ppl 23.60 → 20.59
    (benchmarks/README.md, "The symmetric grid"). Every format and kernel computes (q − zero)·scale, which
    holds for either sign. At 8 bits the step is too fine for this to matter and int8 GEMMs (W8A8) get the
    positive per-channel scales their engines document: amax/127.5 there, as before.
    """
    maxq = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        if bits < 8:
            extreme = torch.where(-xmin >= xmax, xmin, xmax)
            scale = fp16_exact(extreme / -half)
        else:
            scale = fp16_exact(2 * torch.maximum(xmin.abs(), xmax) / maxq)
        zero = torch.full_like(scale, half, dtype=torch.int32)
    else:
        scale = fp16_exact((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq).to(torch.int32)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (same float dtype as w) of w [rows, n] for per-row scale/zero [rows] or [rows, n]."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return (q - zero) * scale


def clip_ratios(device=None) -> torch.Tensor:
    """The clip search's candidate range multipliers: 1, then down in 1/CLIP_GRID steps to 1 - CLIP_MAX_SHRINK."""
    steps = torch.arange(0, int(CLIP_GRID * CLIP_MAX_SHRINK) + 1, device=device)
    return 1.0 - steps / CLIP_GRID


def search_params(w: torch.Tensor, bits: int, symmetric: bool, search: bool = True, min_zero: int = 0):
    """Per-row scale/zero for w [rows, n]: min-max, or the clip ratio that minimises Σ|w - ŵ|^2.4.

    All clip candidates are scored in one batched tensor ([ratios, rows, n], chunked to bound memory).
    """
    w = w.float()
    xmin = torch.minimum(w.min(dim=1).values, torch.zeros(()))
    xmax = torch.maximum(w.max(dim=1).values, torch.zeros(()))
    if not search:
        return params_from_range(xmin, xmax, bits, symmetric, min_zero)
    maxq = (1 << bits) - 1
    ratios = clip_ratios(w.device)
    chunk = max(1, int(2**23 // max(1, w.numel())))
    best_err: Any = None  # the three are set together on the first chunk
    best_scale: Any = None
    best_zero: Any = None
    rows = torch.arange(w.shape[0], device=w.device)
    for start in range(0, len(ratios), chunk):
        r = ratios[start : start + chunk, None]
        scale, zero = params_from_range(xmin[None] * r, xmax[None] * r, bits, symmetric, min_zero)
        s3, z3 = scale[..., None], zero[..., None].float()
        e = torch.div(w[None], s3).round_().add_(z3).clamp_(0, maxq).sub_(z3).mul_(s3).sub_(w[None])
        # |e|^2.4 as exp(2.4·log|e|): 1.7× faster than pow here, and exact at e = 0 (exp(-inf) = 0)
        err = e.abs_().log_().mul_(CLIP_NORM).exp_().sum(dim=-1)  # [ratios, rows]
        e_min, idx = err.min(dim=0)
        s_min, z_min = scale[idx, rows], zero[idx, rows]
        if best_err is None:
            best_err, best_scale, best_zero = e_min, s_min, z_min
            continue
        better = e_min < best_err
        best_err = torch.where(better, e_min, best_err)
        best_scale = torch.where(better, s_min, best_scale)
        best_zero = torch.where(better, z_min, best_zero)
    return best_scale, best_zero


def group_params(w: torch.Tensor, bits: int, symmetric: bool, group_len: int, search: bool = True, min_zero: int = 0):
    """Scale/zero [rows, groups] for contiguous runs of `group_len` columns of w [rows, n] (Scheme.group_len:
    n when per-channel)."""
    rows, n = w.shape
    g = n // group_len
    flat = w.reshape(rows, g, group_len).transpose(0, 1).reshape(g * rows, group_len)
    s, z = search_params(flat, bits, symmetric, search, min_zero)
    return s.view(g, rows).t().contiguous(), z.view(g, rows).t().contiguous()


def weighted_group_params(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_len: int,
    ratios: torch.Tensor,
    min_zero: int = 0,
):
    """Scale/zero [rows, groups] whose per-group range shrink minimises the group's output error over the inputs.

    For group g with inputs X_g, the error of row r is ‖X_g Δw_rgᵀ‖² ∝ Δw_rg H_gg Δw_rgᵀ, where H_gg is the
    group's diagonal block of H = 2XᵀX/n: AWQ's clip objective over every calibration token, from the Hessian
    instead of stored activations. Each (row, group) keeps its best ratio from `ratios`.
    """
    rows, n = w.shape
    gs = group_len
    G = n // gs
    H = H.float()
    idx = torch.arange(G, device=w.device)[:, None] * gs + torch.arange(gs, device=w.device)
    Hb = H[idx[:, :, None], idx[:, None, :]]  # [G, gs, gs]
    # rows in chunks of ≤ WEIGHTED_CHUNK elements: a few chunk-sized temporaries live per ratio, not weight-sized
    step = max(1, WEIGHTED_CHUNK // max(1, n))
    parts = [_weighted_rows(w[i : i + step], Hb, bits, symmetric, ratios, min_zero) for i in range(0, rows, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _weighted_rows(w: torch.Tensor, Hb: torch.Tensor, bits: int, symmetric: bool, ratios: torch.Tensor, min_zero: int):
    """weighted_group_params for a slice of rows; Hb [G, gs, gs] the diagonal blocks of H."""
    G, gs = Hb.shape[0], Hb.shape[1]
    wg = w.float().reshape(w.shape[0], G, gs)
    xmin = torch.minimum(wg.amin(dim=2), torch.zeros(()))
    xmax = torch.maximum(wg.amax(dim=2), torch.zeros(()))
    maxq = (1 << bits) - 1
    best: Any = None  # the three are set together on the first ratio
    best_s: Any = None
    best_z: Any = None
    for r in ratios.tolist():
        s, z = params_from_range(xmin * r, xmax * r, bits, symmetric, min_zero)
        s3, z3 = s[..., None], z[..., None].float()
        d = torch.div(wg, s3).round_().add_(z3).clamp_(0, maxq).sub_(z3).mul_(s3).sub_(wg).transpose(0, 1)  # [G, r, gs]
        err = torch.bmm(d, Hb).mul_(d).sum(-1).t()  # [rows, G]: Δw H_gg Δwᵀ per (row, group)
        if best is None:
            best, best_s, best_z = err, s, z
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def quantize_with_params(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round W [out, in] with given group params [out, G] over contiguous groups (no error feedback)."""
    n = W.shape[1]
    gs = scheme.group_len(n)
    g_idx = (torch.arange(n, device=W.device) // gs).to(torch.int32)
    # Groups are contiguous: broadcast each group's params over a [out, G, gs] view (quantize's arithmetic, in
    # place), not gathered into [out, in] copies: on an 8B MLP that is one 470 MB temporary instead of four.
    Wg = W.reshape(W.shape[0], -1, gs)
    codes = torch.div(Wg, scales[..., None]).round_().add_(zeros[..., None].float()).clamp_(0, scheme.maxq)
    return QuantizedWeight(codes.to(torch.uint8).view(W.shape), scales.float(), zeros.int(), g_idx, scheme)


def rtn_quantize(W: torch.Tensor, scheme: Scheme, clip_search: bool = False, min_zero: int = 0) -> QuantizedWeight:
    """Round-to-nearest with min-max (optionally MSE-clipped) group params: the baseline."""
    W = W.detach().float()
    s, z = group_params(W, scheme.bits, scheme.symmetric, scheme.group_len(W.shape[1]), clip_search, min_zero)
    return quantize_with_params(W, s, z, scheme)
