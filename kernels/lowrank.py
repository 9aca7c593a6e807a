"""The fused low-rank correction of one linear, y += B·(A·x) (an export's EoRA factors, rank 16-64), on the CPU.

Decode-sized calls (at most KERNEL_MAX_ROWS rows of x, fp32 or bf16) run `kernels/csrc/cpu_lowrank.c`: one call
per linear that reads each 16-bit factor once and writes only the columns each part of a merged linear owns. Larger
calls (prefill) and other dtypes run two torch GEMMs per part in fp32 on factors widened for that call (the GEMM
is then the cost, not the widening).

Prepared layout (built once at load by `pack`; never stored in a checkpoint):
  A      int16 [R, K]       the 16-bit factor bits (fp16, or bf16: see `storage`) of every part's A_p [r_p, K]
                            stacked, R = Σ r_p
  B      int16 [Σ N_p·r_p]  each part's B_p [N_p, r_p] row-major (PEFT's lora_B layout), concatenated in part order;
                            no zero blocks: a part the correction leaves alone has no block and its columns of y are
                            never touched
  parts  int64 [P, 4]       per corrected part: (first output column c_p, N_p, first row of A r_p0, r_p), columns
                            ascending and disjoint
Integer dtypes so that a module-wide `.to(dtype)` never converts the bits behind the kernel's back.

Why fp16: the export writes the factors in fp16 wherever they fit (io/lowrank.py `storage_dtype`), so fp16 holds
them bit for bit, with 3 more mantissa bits than bf16; both halve the bytes read per step against fp32, which is
what a decode step pays for. bf16 (fp32's range) is used only when a value exceeds fp16's 65504.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Sequence, Tuple

import torch

FP16_MAX = 65504.0
# Rows of x up to which the C kernel beats the two fp32 GEMMs (benchmarks/lowrank.py --kernel, SmolLM2's shapes on
# two AVX2 cores): it reads half the bytes and skips the widening, but does not block for cache like oneDNN.
KERNEL_MAX_ROWS = 16
_IO_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class LowRankFactors:
    """One linear's correction in the layout above."""

    A: torch.Tensor
    B: torch.Tensor
    parts: torch.Tensor
    bf16: bool  # the bits are bf16 (else fp16)
    out_features: int
    in_features: int

    @property
    def factor_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B, "parts": self.parts}

    def to(self, device) -> LowRankFactors:
        return replace(self, A=self.A.to(device), B=self.B.to(device), parts=self.parts.to(device))

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + B·(A·x) for the linear's input x and its fresh output y (updated in place; see add_correction)."""
        return add_correction(x, y, self)

    def blocks(self):
        """(c_p, r_p0, B_p [N_p, r_p]) per part, B_p a view of the stored bits in the factor dtype."""
        B = self.B.view(self.factor_dtype)
        off = 0
        for c, n, r0, r in self.parts.tolist():
            yield c, r0, B[off : off + n * r].view(n, r)
            off += n * r


def storage(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """fp16 unless a value is beyond its range (then bf16); see the module docstring."""
    big = max(float(t.detach().abs().max()) for t in tensors)
    return torch.float16 if big <= FP16_MAX else torch.bfloat16


def pack(
    name: str, blocks: Sequence[Tuple[int, torch.Tensor, torch.Tensor]], out_features: int, in_features: int
) -> LowRankFactors:
    """blocks: (first output column, A_p [r_p, in_features], B_p [N_p, r_p]) per corrected part of the linear
    `name` (named in errors). Factors must be finite: one NaN would make every output of the model NaN."""
    if not blocks:
        raise ValueError(f"{name}: a low-rank correction needs at least one part")
    end = 0
    for c, a, b in sorted(blocks, key=lambda blk: blk[0]):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{name}: low-rank part at column {c} is B {tuple(b.shape)} · A {tuple(a.shape)}, "
                f"not [N, r] · [r, {in_features}]"
            )
        if c < end or c + b.shape[0] > out_features:
            raise ValueError(f"{name}: low-rank part at column {c} overlaps another or lies outside {out_features}")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"{name}: the low-rank part at column {c} has NaN or Inf")
        end = c + b.shape[0]
    blocks = sorted(blocks, key=lambda blk: blk[0])
    dt = storage([t for _, a, b in blocks for t in (a, b)])
    A = torch.cat([a.to(torch.float32) for _, a, _ in blocks]).to(dt).view(torch.int16).contiguous()
    B = torch.cat([b.to(torch.float32).reshape(-1) for _, _, b in blocks]).to(dt).view(torch.int16).contiguous()
    rows, r0 = [], 0
    for c, a, b in blocks:
        rows.append([c, b.shape[0], r0, a.shape[0]])
        r0 += a.shape[0]
    parts = torch.tensor(rows, dtype=torch.int64)
    return LowRankFactors(A, B, parts, dt == torch.bfloat16, out_features, in_features)


_EXT: list = []  # [the compiled module or None], filled at the first call


def _ext():
    if not _EXT:
        from compress_export.kernels.cpu_wna16 import extension  # the module that sets the ISA at load

        _EXT.append(extension())
    return _EXT[0]


def uses_kernel(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.shape[0] <= KERNEL_MAX_ROWS
        and x.dtype in _IO_DTYPES
        and y.dtype in _IO_DTYPES
        and x.device.type == "cpu"
        and _ext() is not None
    )


def apply_(x: torch.Tensor, y: torch.Tensor, f: LowRankFactors) -> None:
    """y [M, N] += B·(A·x) in place, x [M, K]; both 2-D, row-major."""
    if x.shape[1] != f.in_features or y.shape[1] != f.out_features or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"low-rank correction of a {f.out_features}×{f.in_features} linear applied to x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}"
        )
    if not y.is_contiguous():
        raise ValueError("the low-rank correction updates y in place: y must be contiguous")
    if x.shape[0] == 0:
        return
    if uses_kernel(x, y):
        x = x.contiguous()
        _ext().lowrank_apply(
            x.shape[0],
            f.in_features,
            f.out_features,
            f.A.shape[0],
            x.data_ptr(),
            int(x.dtype == torch.bfloat16),
            y.data_ptr(),
            int(y.dtype == torch.bfloat16),
            f.A.data_ptr(),
            f.B.data_ptr(),
            f.B.numel(),
            f.parts.data_ptr(),
            f.parts.shape[0],
            int(f.bf16),
            torch.get_num_threads(),
        )
    else:
        torch_apply_(x, y, f)


def torch_apply_(x: torch.Tensor, y: torch.Tensor, f: LowRankFactors) -> None:
    """The same in torch, fp32 sums: t = x·Aᵀ once for all parts, then each part's columns += t_p·B_pᵀ."""
    t = x.to(torch.float32) @ f.A.view(f.factor_dtype).to(torch.float32).t()
    for c, r0, b in f.blocks():
        cols = y[:, c : c + b.shape[0]]
        corr = t[:, r0 : r0 + b.shape[1]] @ b.to(torch.float32).t()
        if y.dtype == torch.float32:
            cols += corr
        else:  # one rounding to y's dtype, as the C kernel does
            cols.copy_(cols.to(torch.float32) + corr)


def add_correction(x: torch.Tensor, y: torch.Tensor, f: LowRankFactors) -> torch.Tensor:
    """y + B·(A·x) for a linear's input x [..., K] and output y [..., N] (y, a fresh kernel output, is updated in
    place and returned). Under torch.compile the call is one opaque op."""
    x2 = x.reshape(-1, f.in_features)
    y = y.contiguous()
    y2 = y.view(-1, f.out_features)
    if torch.compiler.is_compiling():
        torch.ops.compress_export.lowrank_apply(x2, y2, f.A, f.B, f.parts, f.bf16)
    else:
        apply_(x2, y2, f)
    return y


def _register_op() -> None:
    """`compress_export::lowrank_apply` for torch.compile (vLLM's compiled mode): mutates y."""

    @torch.library.custom_op("compress_export::lowrank_apply", mutates_args=("y",))
    def lowrank_apply(
        x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, parts: torch.Tensor, bf16: bool
    ) -> None:
        f = LowRankFactors(A, B, parts, bf16, y.shape[1], x.shape[1])
        apply_(x, y, f)


_register_op()
