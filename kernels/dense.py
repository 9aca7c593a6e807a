"""Kernels for pruned, unquantized weights (SparseWeight).

`dense`: the portable fallback; the zeros are stored and multiplied like any weight.
`semi-structured-24`: PyTorch's 2:4 semi-structured sparse matmul (CUTLASS / cuSPARSELt) on CUDA GPUs of compute
capability ≥ 8.0, fp16/bf16, the shapes its kernels accept; prepared layout: `torch.sparse.to_sparse_semi_structured`
of W [out, in] (the kept values plus its own metadata).
"""

from __future__ import annotations

import torch

from compress_export.kernels.base import KernelRequest, LinearKernel, register_kernel


@register_kernel("dense")
class DenseKernel(LinearKernel):
    priority = -10

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if req.bits != 16:
            return False, f"runs float (pruned, unquantized) weights, not {req.bits}-bit codes"
        return True, ""

    def __init__(self, w, req: KernelRequest):
        super().__init__(w, req)
        self.weight = w.dequantize(req.act_dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.device))

    def tensors(self) -> dict:
        return {"weight": self.weight}


@register_kernel("semi-structured-24")
class SemiStructured24Kernel(LinearKernel):
    priority = 10

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if req.sparsity != "2:4":
            return False, "needs a 2:4 mask"
        if req.bits != 16:
            return False, "runs float weights (2:4 with quantized codes has no semi-structured kernel)"
        if req.device != "cuda" or not torch.cuda.is_available():
            return False, f"needs a CUDA device (got {req.device})"
        if torch.cuda.get_device_capability() < (8, 0):
            return False, f"needs compute capability ≥ 8.0 (got {torch.cuda.get_device_capability()})"
        if req.act_dtype not in (torch.float16, torch.bfloat16):
            return False, f"needs fp16/bf16 activations (got {req.act_dtype})"
        if req.out_features % 64 or req.in_features % 64:
            return False, f"needs sizes that are multiples of 64 (got {req.out_features}×{req.in_features})"
        return True, ""

    def __init__(self, w, req: KernelRequest):
        super().__init__(w, req)
        from torch.sparse import to_sparse_semi_structured

        self.weight = to_sparse_semi_structured(w.dequantize(req.act_dtype).cuda())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        pad = (-x2.shape[0]) % 8  # the sparse GEMM wants a token count that is a multiple of 8
        if pad:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
        y = torch.nn.functional.linear(x2, self.weight)
        return y[: y.shape[0] - pad].reshape(*shape[:-1], -1)
