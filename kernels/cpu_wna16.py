"""`cpu-wna16`: the fast CPU kernel for 2/3/4/8-bit weights with float activations (fp32, bf16, fp16).

The weights stay packed in memory and are expanded only in registers by the compiled extension (kernels/csrc/,
built by the package's own build). One build holds every instruction-set variant (portable C, AVX2, AVX-VNNI,
AVX-512-VNNI); cpuid picks the best this CPU runs at import (COMPRESS_EXPORT_CPU_ISA pins one). Calls of fewer than
8 rows (decode) quantize x to int16 per block (relative error 1.5e-5 of the block's largest value, far below bf16's)
and multiply the codes as int16 with exact integer sums; larger calls (prefill) quantize x to int8 per block and
multiply with u8 × s8 dot products (W4A8), or, with COMPRESS_EXPORT_PREFILL=float, dequantize W a tile of rows at a
time for torch's GEMM.

Prepared layouts (built once at load from a QuantizedWeight; never stored in a checkpoint: they depend on the kernel):
- 2/3/4-bit codes (2/3-bit fit the 4-bit container exactly): the panel layout of kernels/csrc/cpu_w4a8.c
    qweight uint8 [Np/8, K/8, 32], Np = out rounded up to 8: 8 outputs × 8 columns per 32 bytes (see `pack_panels`)
    scales  int16 [G, Np]  the fp16 bits of the scales, 8 outputs per vector load (our passes round scales to fp16)
    zeros   uint8 [G, Np]  zero points in code units; pruned 2:4 codes sit at theirs and add exactly 0
  Decode-sized calls run its int16 kernel; prefill-sized ones its W4A8 kernel (x in int8 per block, exact integer
  sums) unless COMPRESS_EXPORT_PREFILL=float, which dequantizes a tile at a time for torch's GEMM instead.
- 8-bit codes: the row layout of kernels/csrc/cpu_wna16.c (`pack_codes`; the CUDA kernel's too)
    qweight uint8 [out, in]; scales int16 [out, G]; zeros uint8 [out, G]
- perm int64 [in] or None: input columns in group order when act-order regrouped them; x is permuted once per call,
  so the codes are stored in that order too.
Bytes per 4-bit weight: 0.5 + 3/group (0.547 at group 64, 0.594 at group 32).
"""

from __future__ import annotations

import torch

from compress_export.core import settings
from compress_export.core.errors import UserError
from compress_export.core.hardware import native_bf16
from compress_export.core.result import QuantizedWeight
from compress_export.kernels.base import WEIGHT_ONLY, KernelRequest, LinearKernel, group_order, register_kernel, restore

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def extension():
    """The compiled module, or None (then `extension_error()` says why)."""
    try:
        from compress_export.kernels import _cpu  # noqa: F401  (torch is imported first: the extension shares torch's OpenMP runtime)
    except ImportError:
        return None
    return _cpu


_EXT = extension()
if _EXT is not None:  # once, at load: the C code reads no environment (tests switch it with set_isa themselves)
    try:
        _EXT.set_isa(settings.get("CPU_ISA"))
    except ValueError as e:  # a variant this CPU lacks: running it would be an illegal instruction
        raise UserError(f"COMPRESS_EXPORT_CPU_ISA: {e}; this CPU runs {', '.join(_EXT.isas())}") from None


def extension_error() -> str:
    try:
        from compress_export.kernels import _cpu  # type: ignore[attr-defined]  # noqa: F401  (built, not a .py)
    except ImportError as e:
        return (
            f"the compiled CPU kernel is not built ({e}); reinstall with a C compiler present "
            "(pip install -e . builds kernels/csrc/cpu_wna16.c)"
        )
    return ""


def isa() -> str:
    ext = extension()
    return ext.isa() if ext is not None else "not built"


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes (pure torch ops, any device): qweight → codes [out, in] in qweight's dtype."""
    if bits == 8:
        return qweight
    n = qweight.shape[0]
    chunks = qweight.view(n, -1, 1, 16)
    return torch.cat([chunks & 0xF, chunks >> 4], dim=2).reshape(n, -1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [out, in] (in a multiple of 32) → the kernel's qweight (layout above)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    out_f, in_f = codes.shape
    c = codes.reshape(out_f, in_f // 32, 2, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(out_f, in_f // 2).contiguous()


def pack_panels(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [out, in] (values < 16, in a multiple of 8) → the panel layout, uint8 [Np/8, in/8, 32]: in each
    32-byte cell, byte 4i + 2h + f holds output i's columns 2(2f) + h (low nibble) and 2(2f+1) + h (high nibble)."""
    out_f, in_f = codes.shape
    npad = -out_f % 8
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, npad))
    c = c.view(-1, 8, in_f // 8, 2, 2, 2).permute(0, 2, 1, 5, 3, 4)  # [p, i, c, (f, nib, h)] → [p, c, i, h, f, nib]
    return (c[..., 0] | (c[..., 1] << 4)).reshape(-1, in_f // 8, 32).contiguous()


def unpack_panels(qweight: torch.Tensor, out_f: int) -> torch.Tensor:
    """Inverse of pack_panels (pure torch ops): the panel layout → codes uint8 [out, in]."""
    P, C, _ = qweight.shape
    b = qweight.view(P, C, 8, 2, 2)  # [p, c, i, h, f]
    nib = torch.stack([b & 0xF, b >> 4], dim=-1)  # [p, c, i, h, f, nib]
    return nib.permute(0, 2, 1, 4, 5, 3).reshape(P * 8, C * 8)[:out_f].contiguous()


def panel_side(t: torch.Tensor, dtype) -> torch.Tensor:
    """scales or zeros [out, G] → [G, Np] (outputs padded to 8 with zeros), contiguous."""
    return torch.nn.functional.pad(t.to(dtype), (0, 0, 0, -t.shape[0] % 8)).t().contiguous()


def codes_problem(req: KernelRequest, act_dtypes=ACT_DTYPES, group_multiple: int = 1) -> str:
    """Why the packed-codes layout cannot hold this layer ("" when it can): shared by the CPU and CUDA kernels."""
    if req.bits not in (2, 3, 4, 8):
        return f"runs 2/3/4/8-bit codes, not {req.bits}-bit"
    if req.act_bits != 16:
        return WEIGHT_ONLY
    if req.act_dtype not in act_dtypes:
        return f"activations must be one of {[str(d).replace('torch.', '') for d in act_dtypes]} (got {req.act_dtype})"
    if req.in_features % 32:
        return f"in_features {req.in_features} is not a multiple of 32"
    if req.uneven_groups:
        return "needs whole groups; this act-order row-parallel shard holds parts of many groups"
    gs = req.group_size
    if not req.per_channel and (gs % group_multiple or not req.groups_divide()):
        return f"group size {gs} must be a multiple of {group_multiple} dividing in_features {req.in_features}"
    return ""


class PackedCodes(LinearKernel):
    """The layout above, prepared from a QuantizedWeight and given back exactly (both wna16 kernels)."""

    invertible = True

    def __init__(self, qw: QuantizedWeight, req: KernelRequest):
        super().__init__(qw, req)
        self.out_features, self.in_features = qw.shape
        self.bits, self.scheme = qw.scheme.bits, qw.scheme
        self.group = qw.scheme.group_len(self.in_features)
        self.perm = group_order(qw)
        self.qweight = pack_codes(qw.codes if self.perm is None else qw.codes[:, self.perm], self.bits)
        # fp16 bits in an integer tensor: a module-wide .to(dtype) never converts them behind the kernel's back
        self.scales = qw.scales.to(torch.float16).view(torch.int16).contiguous()
        self.zeros = qw.zeros.to(torch.uint8).contiguous()

    def tensors(self) -> dict:
        t = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        return {**t, "perm": self.perm} if self.perm is not None else t

    def quantized_weight(self) -> QuantizedWeight:
        return restore(
            unpack_codes(self.qweight, self.bits).cpu(),
            self.scales.view(torch.float16).cpu(),
            self.zeros.cpu(),
            self.perm,
            self.scheme,
        )


@register_kernel("cpu-wna16")
class CpuWNA16Kernel(PackedCodes):
    priority = 20
    GEMM_MIN_ROWS = 16  # see use_gemm (8-bit codes and the float prefill path)
    TILE_BYTES = 4 << 20  # a dequantized tile of W stays in cache while the GEMM reads it

    def __init__(self, qw: QuantizedWeight, req: KernelRequest):
        if qw.scheme.bits == 8:
            super().__init__(qw, req)
            return
        LinearKernel.__init__(self, qw, req)
        self.out_features, self.in_features = qw.shape
        self.bits, self.scheme = qw.scheme.bits, qw.scheme
        self.group = qw.scheme.group_len(self.in_features)
        self.perm = group_order(qw)
        self.qweight = pack_panels(qw.codes if self.perm is None else qw.codes[:, self.perm])
        self.scales = panel_side(qw.scales.to(torch.float16).view(torch.int16), torch.int16)
        self.zeros = panel_side(qw.zeros, torch.uint8)

    def quantized_weight(self) -> QuantizedWeight:
        if self.bits == 8:
            return super().quantized_weight()
        n = self.out_features
        return restore(
            unpack_panels(self.qweight, n).cpu(),
            self.scales[:, :n].t().view(torch.float16).cpu(),
            self.zeros[:, :n].t().cpu(),
            self.perm,
            self.scheme,
        )

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if req.device != "cpu":
            return False, f"runs on the CPU (got {req.device})"
        why = codes_problem(req, group_multiple=32) or extension_error()
        return (not why), why

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        args = (self.qweight, self.scales, self.zeros, self.bits, self.group, self.out_features)
        if torch.compiler.is_compiling():  # opaque to dynamo; eager calls skip the dispatcher
            y = torch.ops.compress_export.cpu_wna16(x2, *args)
        else:
            y = run(x2, *args)
        return y.view(*lead, self.out_features)


def prefill_path(m: int) -> str:
    """Which kernel runs m rows of 2/3/4-bit codes: `int16` (decode sizes), `w4a8` or `float` (prefill sizes;
    COMPRESS_EXPORT_PREFILL). The crossover is measured by benchmarks/cpu_kernel.py."""
    if m < W4A8_MIN_ROWS:
        return "int16"
    return "w4a8" if settings.get("PREFILL") == "int8" else "float"


W4A8_MIN_ROWS = 8


def use_gemm(m: int, weights: int) -> bool:
    """Dequantize-and-GEMM instead of the integer kernel? Measured crossovers (benchmarks/cpu_kernel.py, two AVX2
    cores): 8-16 rows of x for layers whose weights fit in cache (SmolLM2's), 16-32 rows for 8B-sized ones, where
    the integer kernel saves more by not reading W in fp32."""
    return m >= 2 * CpuWNA16Kernel.GEMM_MIN_ROWS or (m >= CpuWNA16Kernel.GEMM_MIN_ROWS and weights <= 1 << 22)


def run(x: torch.Tensor, qweight, scales, zeros, bits: int, group: int, out_features: int) -> torch.Tensor:
    """y [M, out] = x [M, in] · Wᵀ in x's dtype; x's columns already in group order."""
    M, K = x.shape
    N = out_features
    if bits == 8:
        if use_gemm(M, N * K):
            return _tiled_gemm(x, qweight, scales, zeros, bits, group, N)
        fn = lambda *a: _EXT.gemm(bits, *a)  # noqa: E731
    else:
        path = prefill_path(M)
        if path == "float":
            return _tiled_gemm(x, qweight, scales, zeros, bits, group, N)
        fn = _EXT.w4a8_gemm if path == "w4a8" else _EXT.w4_gemv16
    bf16 = x.dtype == torch.bfloat16  # the extension reads and writes bf16 itself
    xf = x.contiguous() if bf16 or x.dtype == torch.float32 else x.to(torch.float32).contiguous()
    y = torch.empty((M, N), dtype=xf.dtype)
    fn(
        M,
        N,
        K,
        group,
        xf.data_ptr(),
        qweight.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
        int(bf16),
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _tiled_gemm(x, qweight, scales, zeros, bits, group, N) -> torch.Tensor:
    """Prefill on the exact float path: dequantize W a tile of output rows at a time into torch's GEMM."""

    def dequant(n0, n1, tile):
        rows = _EXT.dequant if bits == 8 else _EXT.w4_dequant
        rows(
            *((bits,) if bits == 8 else ()),
            N,
            x.shape[1],
            group,
            n0,
            n1,
            qweight.data_ptr(),
            scales.data_ptr(),
            zeros.data_ptr(),
            tile.data_ptr(),
            int(tile.dtype == torch.bfloat16),
            torch.get_num_threads(),
        )

    return tiled_product(x, N, CpuWNA16Kernel.TILE_BYTES, dequant)


def tiled_product(x: torch.Tensor, N: int, tile_bytes: int, fill) -> torch.Tensor:
    """x·Wᵀ for prefill-sized x, where W is not a dense tensor: fill(n0, n1, tile) writes W's output rows n0..n1
    into tile ([n1 − n0, K], in the GEMM's dtype), a tile at a time so it stays in cache, and torch's GEMM
    (oneDNN/MKL) multiplies. A weight that fits one tile is one `linear` call; larger ones compute yᵀ [out, M]
    tile by tile into row slices."""
    M, K = x.shape
    # bf16 tiles only where the CPU multiplies bf16 natively; elsewhere an fp32 GEMM is several times faster
    wdtype = torch.bfloat16 if x.dtype == torch.bfloat16 and native_bf16() else torch.float32
    xw = x.to(wdtype)
    rows = max(16, tile_bytes // (K * wdtype.itemsize)) // 16 * 16
    buf = torch.empty(min(rows, N), K, dtype=wdtype)

    def tile(n0, n1):
        fill(n0, n1, buf[: n1 - n0])
        return buf[: n1 - n0]

    if rows >= N:
        return torch.nn.functional.linear(xw, tile(0, N)).to(x.dtype)
    yt = torch.empty(N, M, dtype=wdtype)
    xt = xw.t()
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        torch.mm(tile(n0, n1), xt, out=yt[n0:n1])
    return yt.t().to(x.dtype).contiguous()  # callers (vLLM's q/k/v split) expect row-major outputs


def _register_op() -> None:
    """`compress_export::cpu_wna16` for torch.compile (vLLM's compiled mode): one opaque call per linear."""

    @torch.library.custom_op("compress_export::cpu_wna16", mutates_args=())
    def cpu_wna16(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group: int,
        out_features: int,
    ) -> torch.Tensor:
        return run(x.contiguous(), qweight, scales, zeros, bits, group, out_features)

    @cpu_wna16.register_fake
    def _(x, qweight, scales, zeros, bits, group, out_features):
        return x.new_empty(x.shape[0], out_features)


_register_op()
