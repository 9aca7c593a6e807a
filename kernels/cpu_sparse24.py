"""`cpu-sparse24`: the CPU kernel for 2:4-pruned weights, unquantized or with 2/3/4-bit codes, that reads only the
kept half of W (kernels/csrc/cpu_sparse24.c).

Decode-sized calls (few rows of x) read each row's kept weights and 1-bit-per-weight positions, place them into
dense registers (one permute and one blend per 8 inputs, from a 256-entry table) and multiply them with every row of
x: the pruned half is never read. Large calls (prefill) expand W a tile of rows at a time into the GEMM's dtype and
hand each tile to torch's GEMM, as cpu-wna16 does.

Which layers: 2:4 float weights (SparseWeight) on the CPU. 2:4 + 2/3/4-bit codes run correctly here too, but
cpu-wna16 on the dense codes is faster on AVX2 (see `run_codes`), so the registry gives those to cpu-wna16.

Prepared layout (built once at load; never stored in a checkpoint: it depends on the kernel):
  meta    uint8 [out, in/8]: byte i covers inputs 8i..8i+7 (two groups of 4); bits 0-1 and 2-3 hold the first
          group's kept positions (0..3, ascending), bits 4-5 and 6-7 the second's. 1 bit per weight.
  values  float weights: [out, in/2], the kept weights in column order, as the bits of the narrowest of bf16, fp16
          and fp32 that holds every one exactly (int16 / int32 tensors: a module-wide .to(dtype) cannot convert
          them), so the kernel gives its weight back exactly. bf16 only: each run of 16 is stored interleaved
          0, 8, 1, 9, ..., 7, 15, so the kernel widens a 32-byte load to fp32 with a shift and a mask.
          quantized: uint8 [out, in/4], the kept codes in column order, two per byte (the first in the low nibble).
  scales  quantized only: int16 [out, G], the fp16 bits of the scales; zeros uint8 [out, G].
Bytes per weight: 1.125 with bf16 values (dense bf16: 2, fp32: 4); 0.375 + 3/group with 4-bit codes (0.42 at g64).
Inputs with inf or NaN give NaN rows (the dense product multiplies the pruned zeros with them too).
"""

from __future__ import annotations

import torch

from compress_export.core.errors import UserError
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.sparsity import Sparsity
from compress_export.kernels.base import WEIGHT_ONLY, KernelRequest, LinearKernel, register_kernel
from compress_export.kernels.cpu_wna16 import extension, extension_error, tiled_product

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KIND_F32, KIND_BF16, KIND_F16, KIND_Q4 = 0, 1, 2, 4
_VALUE_DTYPES = ((KIND_BF16, torch.bfloat16, torch.int16), (KIND_F16, torch.float16, torch.int16))
_KIND_DTYPE = {KIND_F32: torch.float32, KIND_BF16: torch.bfloat16, KIND_F16: torch.float16}


def positions(mask: torch.Tensor, name: str = "a linear") -> torch.Tensor:
    """bool [out, in] keeping exactly 2 of every 4 → the kept positions int64 [out, in/2] (ascending per group)."""
    out_f, in_f = mask.shape
    g = mask.reshape(out_f, in_f // 4, 4)
    if not bool((g.sum(dim=2) == 2).all()):
        raise UserError(f"{name}: cpu-sparse24 needs exactly 2 kept weights in every group of 4 (a 2:4 mask)")
    return torch.arange(4).expand_as(g)[g].reshape(out_f, in_f // 2)


def pack_meta(pos: torch.Tensor) -> torch.Tensor:
    """positions [out, in/2] → meta uint8 [out, in/8] (layout above)."""
    p = pos.to(torch.uint8).reshape(pos.shape[0], -1, 4)
    return (p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)).contiguous()


def unpack_meta(meta: torch.Tensor) -> torch.Tensor:
    m = meta.long()
    return torch.stack([(m >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(meta.shape[0], -1)


def pack_kept_codes(kept: torch.Tensor) -> torch.Tensor:
    """kept codes [out, in/2] (< 16) → uint8 [out, in/4] (layout above: two per byte, the first in the low nibble)."""
    c = kept.to(torch.uint8).reshape(kept.shape[0], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def unpack_kept_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1)


def interleave_bf16(kept: torch.Tensor) -> torch.Tensor:
    """[out, in/2] → within each run of 16: 0, 8, 1, 9, ..., 7, 15 (layout above); deinterleave_bf16 undoes it."""
    return kept.reshape(kept.shape[0], -1, 2, 8).transpose(2, 3).reshape(kept.shape).contiguous()


def deinterleave_bf16(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1, 8, 2).transpose(2, 3).reshape(values.shape).contiguous()


def _kept_cols(pos: torch.Tensor) -> torch.Tensor:
    return (torch.arange(pos.shape[1]) // 2 * 4)[None, :] + pos


@register_kernel("cpu-sparse24")
class CpuSparse24Kernel(LinearKernel):
    priority = 30  # above cpu-wna16 (20), which runs 2:4 + W4 on the dense codes, and dense (-10)
    invertible = True
    # Chosen for 2:4 + 2/3/4-bit codes too? Off: on AVX2 cpu-wna16 on the dense codes (7 instructions per 32
    # weights, no shuffles) is 4-5× faster at decode than gathering the kept codes (benchmarks/sparse24_kernel.py),
    # so the 25% fewer bytes do not pay there. The code path is complete and tested; turn it on where it measures
    # faster.
    run_codes = False
    GEMM_MIN_ROWS = 16  # see use_gemm
    TILE_BYTES = 4 << 20  # an expanded tile of W stays in cache while the GEMM reads it

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if req.device != "cpu":
            return False, f"runs on the CPU (got {req.device})"
        if req.sparsity != "2:4":
            return False, "runs 2:4-pruned weights only"
        if req.bits not in (2, 3, 4, 16):
            return False, f"runs float values or 2/3/4-bit codes, not {req.bits}-bit"
        if req.act_bits != 16:
            return False, WEIGHT_ONLY
        if req.act_dtype not in ACT_DTYPES:
            return False, f"activations must be fp32, bf16 or fp16 (got {req.act_dtype})"
        if req.in_features % 32:
            return False, f"in_features {req.in_features} is not a multiple of 32"
        if req.bits != 16:
            if not cls.run_codes:
                return False, "2:4 + b-bit codes run faster in cpu-wna16 on the dense codes (run_codes is off)"
            if req.has_g_idx:
                return False, "act-order g_idx: needs groups of contiguous columns"
            if not req.per_channel and (req.group_size % 32 or not req.groups_divide()):
                return False, f"group size {req.group_size} must be a multiple of 32 dividing {req.in_features}"
        why = extension_error()
        return (not why), why

    def __init__(self, w, req: KernelRequest):
        super().__init__(w, req)
        self.out_features, self.in_features = w.shape
        pos = positions(w.mask.cpu())
        self.meta = pack_meta(pos)
        rows, cols = torch.arange(self.out_features)[:, None], _kept_cols(pos)
        self.bias = w.bias
        if isinstance(w, SparseWeight):
            self.scheme, self.group = None, self.in_features
            kept = w.values.cpu()[rows, cols].float()
            self.kind, self.values = KIND_F32, kept.view(torch.int32).contiguous()
            for kind, dt, bits in _VALUE_DTYPES:  # the narrowest exact dtype: fewer bytes, same weight
                if torch.equal(kept.to(dt).float(), kept):
                    v = kept.to(dt).view(bits)
                    self.kind, self.values = kind, interleave_bf16(v) if kind == KIND_BF16 else v.contiguous()
                    break
            self.scales = self.zeros = torch.empty(0, dtype=torch.uint8)
        else:
            self.scheme, self.group, self.kind = w.scheme, w.scheme.group_len(self.in_features), KIND_Q4
            self.values = pack_kept_codes(w.codes.cpu()[rows, cols])
            self.scales = w.scales.to(torch.float16).view(torch.int16).contiguous()
            self.zeros = w.zeros.to(torch.uint8).contiguous()

    def tensors(self) -> dict:
        t = {"values": self.values, "meta": self.meta}
        return t if self.scheme is None else {**t, "scales": self.scales, "zeros": self.zeros}

    def quantized_weight(self):
        """The weight prepared from, exactly: a SparseWeight (float values) or a QuantizedWeight with its mask."""
        pos = unpack_meta(self.meta.cpu())
        cols = _kept_cols(pos)
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool).scatter_(1, cols, True)
        if self.scheme is None:
            v = deinterleave_bf16(self.values.cpu()) if self.kind == KIND_BF16 else self.values.cpu()
            kept = v.view(_KIND_DTYPE[self.kind]).float()
            values = torch.zeros(self.out_features, self.in_features).scatter_(1, cols, kept)
            return SparseWeight(values, mask, Sparsity(2, 4), self.bias)
        zeros = self.zeros.cpu().to(torch.int32)
        g_idx = (torch.arange(self.in_features) // self.group).to(torch.int32)
        codes = zeros[:, g_idx.long()].to(torch.uint8)
        codes.scatter_(1, cols, unpack_kept_codes(self.values.cpu()))
        scales = self.scales.cpu().view(torch.float16).float()
        return QuantizedWeight(codes, scales, zeros, g_idx, self.scheme, self.bias, mask)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        args = (self.values, self.meta, self.scales, self.zeros, self.kind, self.group)
        if torch.compiler.is_compiling():  # opaque to dynamo; eager calls skip the dispatcher
            y = torch.ops.compress_export.cpu_sparse24(x2, *args)
        else:
            y = run(x2, *args)
        return y.view(*lead, self.out_features)


def use_gemm(m: int, weights: int) -> bool:
    """Expand-and-GEMM instead of the sparse kernel? The sparse kernel places each chunk's kept weights once per
    call and multiplies them with every row of x, so its cost grows with M at the dense FMA rate plus a fixed
    shuffle cost; torch's GEMM blocks better once M is large. Measured (benchmarks/sparse24_kernel.py, AVX2):
    at 16 rows the sparse kernel still wins on 8B-sized layers, which it reads from memory, but not on SmolLM2's,
    which stay in cache."""
    return m >= 2 * CpuSparse24Kernel.GEMM_MIN_ROWS or (m >= CpuSparse24Kernel.GEMM_MIN_ROWS and weights <= 1 << 22)


def run(x: torch.Tensor, values, meta, scales, zeros, kind: int, group: int) -> torch.Tensor:
    """y [M, out] = x [M, in] · Wᵀ in x's dtype."""
    M, K = x.shape
    N = meta.shape[0]
    if use_gemm(M, N * K):
        return _tiled_gemm(x, values, meta, scales, zeros, kind, group)
    bf16 = x.dtype == torch.bfloat16  # the extension reads and writes bf16 itself
    xf = x.contiguous() if bf16 or x.dtype == torch.float32 else x.to(torch.float32).contiguous()
    y = torch.empty((M, N), dtype=xf.dtype)
    extension().sparse24_gemm(
        kind,
        M,
        N,
        K,
        group,
        xf.data_ptr(),
        values.data_ptr(),
        meta.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
        int(bf16),
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def expand(values, meta, scales, zeros, kind: int, group: int, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [n0, n1) of the dense W into out ([n1 − n0, in], fp32 or bf16)."""
    K = meta.shape[1] * 8
    if out.shape != (n1 - n0, K) or out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
        raise ValueError(f"expand: out must be a contiguous fp32/bf16 [{n1 - n0}, {K}] tensor")
    extension().sparse24_expand(
        kind,
        meta.shape[0],
        K,
        group,
        n0,
        n1,
        values.data_ptr(),
        meta.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr(),
        out.data_ptr(),
        int(out.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return out


def _tiled_gemm(x, values, meta, scales, zeros, kind, group) -> torch.Tensor:
    """Prefill: expand W a tile of output rows at a time (the tile stays in cache) and multiply with torch's GEMM."""

    def fill(n0, n1, tile):
        expand(values, meta, scales, zeros, kind, group, n0, n1, tile)

    return tiled_product(x, meta.shape[0], CpuSparse24Kernel.TILE_BYTES, fill)


def _register_op() -> None:
    """`compress_export::cpu_sparse24` for torch.compile (vLLM's compiled mode): one opaque call per linear."""

    @torch.library.custom_op("compress_export::cpu_sparse24", mutates_args=())
    def cpu_sparse24(
        x: torch.Tensor,
        values: torch.Tensor,
        meta: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        kind: int,
        group: int,
    ) -> torch.Tensor:
        return run(x.contiguous(), values, meta, scales, zeros, kind, group)

    @cpu_sparse24.register_fake
    def _(x, values, meta, scales, zeros, kind, group):
        return x.new_empty(x.shape[0], meta.shape[0])


_register_op()
