"""W8A8: int8 weights (one scale per output channel) times int8 activations (one scale per token, computed at
run time, symmetric), accumulated in int32: the arithmetic of vLLM's dynamic int8 path (oneDNN on CPU, CUTLASS on
GPU), so our loader, `compress-export eval` and `from_pretrained` measure what vLLM serves.

Prepared layout:
  weight_t   int8  [in, out]   the signed codes q − 128, transposed for torch._int_mm (x_q [m, in] @ weight_t)
  scale      fp32  [1, out]    per-output-channel weight scales
Per call: s_x = max|x_row| / 127, x_q = round(x / s_x) clamped to [−128, 127], y = (x_q @ weight_t) · s_x · scale.
"""
from __future__ import annotations

import torch

from compress_export.result import QuantizedWeight

from .base import KernelRequest, LinearKernel, register_kernel


def quantize_per_token(x: torch.Tensor):
    """(int8 codes [m, k], fp32 scales [m, 1]) of x [m, k]: symmetric, one scale per row; all-zero rows get
    scale 1 so they stay exact zeros."""
    x = x.float()
    s = x.abs().amax(dim=-1, keepdim=True) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp_(-128, 127).to(torch.int8), s


def int8_matmul(xq: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Exact x_q @ w_t (int32 accumulation). On CUDA, torch._int_mm (it wants more than 16 rows and sizes in
    multiples of 8). Elsewhere a float64 matmul, exact because every partial sum of int8 products stays far below
    2^53: on the CPU it is 25× faster than torch._int_mm, which has no optimised CPU kernel (2048×576×1536)."""
    m, k = xq.shape
    if xq.device.type == "cuda" and m > 16 and k % 8 == 0 and wt.shape[1] % 8 == 0:
        return torch._int_mm(xq, wt)
    return xq.double() @ wt.double()


@register_kernel("int8-dynamic")
class Int8DynamicKernel(LinearKernel):
    priority = 5
    invertible = True

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if req.act_bits != 8:
            return False, "runs W8A8 layers (int8 activations); this one keeps its activations in float"
        if (req.bits, req.group_size, req.symmetric) != (8, -1, True):
            return False, "needs 8-bit symmetric weights with one scale per output channel"
        if not req.act_dtype.is_floating_point:
            return False, f"activations must be floating point, got {req.act_dtype}"
        return True, ""

    def __init__(self, qw: QuantizedWeight, req: KernelRequest):
        super().__init__(qw, req)
        self.scheme = qw.scheme
        self.weight_t = (qw.codes.int() - qw.scheme.sym_zero).to(torch.int8).t().contiguous()
        self.scale = qw.scales.float().view(1, -1).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, sx = quantize_per_token(x.reshape(-1, x.shape[-1]))
        acc = int8_matmul(xq, self.weight_t.to(x.device))
        y = (acc * sx.double() * self.scale.to(x.device).double()).float()
        return y.to(x.dtype).view(*lead, -1)

    def quantized_weight(self) -> QuantizedWeight:
        codes = (self.weight_t.t().int() + self.scheme.sym_zero).to(torch.uint8).contiguous()
        out_f, in_f = codes.shape
        zeros = torch.full((out_f, 1), self.scheme.sym_zero, dtype=torch.int32)
        return QuantizedWeight(codes, self.scale.view(-1, 1).clone(), zeros, torch.zeros(in_f, dtype=torch.int32),
                               self.scheme)

    def tensors(self) -> dict:
        return {"weight_t": self.weight_t, "scale": self.scale}
