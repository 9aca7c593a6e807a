"""`cuda-wna16`: 2/3/4/8-bit weights on CUDA where vLLM has no kernel (2/3-bit, asymmetric GPTQ in vllm 0.32).

A torch-compiled kernel, not hand-written CUDA: dequantization and the product are plain torch ops that
torch.compile (inductor) fuses. Decode-sized calls (M ≤ DECODE_ROWS) are written as a broadcast multiply and a
row reduction, which inductor turns into one Triton reduction kernel that reads the packed codes and expands them
in registers (the approach of PyTorch's gpt-fast); larger calls dequantize W once and use cuBLAS. Inside vLLM's own
compiled graph the same ops are traced into vLLM's graph; in eager mode this module's compiled function runs.

Prepared layout: the CPU kernel's (kernels/cpu_wna16.py: `pack_codes`/`unpack_codes`, one packer for both): qweight
uint8 [out, in/2] (8-bit: [out, in]), scales as fp16 bits (int16) [out, G], zeros uint8 [out, G], perm int64 [in]
or None.
"""

from __future__ import annotations

import functools

import torch

from compress_export.core.result import QuantizedWeight
from compress_export.kernels.base import KernelRequest, register_kernel
from compress_export.kernels.cpu_wna16 import PackedCodes, codes_problem, unpack_codes

DECODE_ROWS = 8


def dequantize(qweight, scales, zeros, bits: int, group: int, dtype) -> torch.Tensor:
    codes = unpack_codes(qweight, bits)
    n, k = codes.shape
    w = codes.view(n, k // group, group).to(dtype) - zeros.to(dtype).unsqueeze(-1)
    return (w * scales.view(torch.float16).to(dtype).unsqueeze(-1)).view(n, k)


def linear(x: torch.Tensor, qweight, scales, zeros, bits: int, group: int) -> torch.Tensor:
    """y [M, out] = x [M, in] · Wᵀ; pure torch, so torch.compile can fuse it (see the module docstring)."""
    w = dequantize(qweight, scales, zeros, bits, group, x.dtype)
    if x.shape[0] <= DECODE_ROWS:
        acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 products summed in fp32
        return (x.unsqueeze(1) * w.unsqueeze(0)).sum(-1, dtype=acc).to(x.dtype)
    return x @ w.t()


@functools.cache
def compiled():
    return torch.compile(linear, dynamic=True)


@register_kernel("cuda-wna16")
class CudaWNA16Kernel(PackedCodes):
    priority = 15

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if req.device != "cuda" or not torch.cuda.is_available():
            return False, f"needs a CUDA device (got {req.device})"
        why = codes_problem(req, (torch.float16, torch.bfloat16, torch.float32))
        return (not why), why

    def __init__(self, qw: QuantizedWeight, req: KernelRequest):
        super().__init__(qw, req)
        for name, t in self.tensors().items():
            setattr(self, name, t.to(req.device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        fn = linear if torch.compiler.is_compiling() else compiled()
        y = fn(x2, self.qweight, self.scales, self.zeros, self.bits, self.group)
        return y.reshape(*lead, self.out_features)
