"""W8A8: int8 weights (one scale per output channel) times int8 activations (one scale per token, computed at
run time, symmetric), accumulated in int32: the arithmetic of vLLM's dynamic int8 path (oneDNN on CPU, CUTLASS on
GPU), so our loader, `compress-export eval` and `from_pretrained` measure what vLLM serves, and our vLLM plugin
serves it exactly on the CPUs where vLLM's own int8 GEMM is not exact (integrations/vllm_route.py).

Prepared layout (the checkpoint's own, unpacked):
  weight  int8  [out, in]   the signed codes q − 128
  scale   fp32  [1, out]    per-output-channel weight scales
Per call: s_x = max|x_row| / 127, x_q = round(x / s_x) clamped to [−128, 127], y = (x_q · weightᵀ) · s_x · scale.
The integer product is exact everywhere: the compiled CPU kernel (kernels/csrc/cpu_int8.c, int16 pair products
summed in int32; it also quantizes x and applies the scales, one call per linear), torch._int_mm on CUDA, else a
float64 matmul (every partial sum of int8 products is far below 2^53).
"""

from __future__ import annotations

import torch

from compress_export.core.result import QuantizedWeight
from compress_export.kernels.base import KernelRequest, LinearKernel, register_kernel


def extension():
    """The compiled CPU kernels (kernels/csrc: the int8 entry points live beside cpu-wna16's), or None when the
    package was installed without a C compiler."""
    from compress_export.kernels.cpu_wna16 import extension as compiled

    return compiled()


_EXT = extension()


def quantize_per_token(x: torch.Tensor):
    """(int8 codes [m, k], fp32 scales [m, 1]) of x [m, k]: symmetric, one scale per row; all-zero rows get
    scale 1 so they stay exact zeros; a row with NaN keeps scale NaN, so its outputs are NaN, not garbage."""
    x = x.float()
    s = x.abs().amax(dim=-1, keepdim=True) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(x / s).clamp_(-128, 127).to(torch.int8), s


def int8_matmul(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact xq [m, k] · w [n, k]ᵀ, both int8: int32 (CPU, CUDA) or float64 [m, n] holding the same integers.
    The compiled CPU GEMM measured 2-4× faster than a float64 matmul and no slower than an fp32 one from decode to
    512-row prefill (one AVX2 core); torch._int_mm has no optimised CPU kernel (25× slower) but is CUDA's int8
    GEMM (it wants more than 16 rows and sizes in multiples of 8)."""
    m, k = xq.shape
    if xq.device.type == "cpu" and _EXT is not None:
        acc = torch.empty(m, w.shape[0], dtype=torch.int32)
        xq = xq.contiguous()
        _EXT.int8_gemm(m, w.shape[0], k, xq.data_ptr(), w.data_ptr(), acc.data_ptr(), torch.get_num_threads())
        return acc
    if xq.device.type == "cuda" and m > 16 and k % 8 == 0 and w.shape[0] % 8 == 0:
        return torch._int_mm(xq, w.t())
    return xq.double() @ w.double().t()


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [m, n] in x's dtype = per-token int8 x [m, k] times the int8 weight [n, k] with per-channel scale [1, n].
    On the CPU the compiled kernel does all of it in one call (the same floats: tests/test_w8a8.py)."""
    if x.device.type == "cpu" and _EXT is not None:
        m, k = x.shape
        xf = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        y = torch.empty(m, weight.shape[0], dtype=torch.float32)
        _EXT.int8_linear(
            m,
            weight.shape[0],
            k,
            xf.data_ptr(),
            weight.data_ptr(),
            scale.data_ptr(),
            y.data_ptr(),
            torch.get_num_threads(),
        )
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    return w8a8_reference(x, weight, scale)


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w8a8_linear in torch ops (any device)."""
    xq, sx = quantize_per_token(x)
    acc = int8_matmul(xq, weight)
    return (acc.double() * sx.double() * scale.double()).float().to(x.dtype)


@register_kernel("int8-dynamic")
class Int8DynamicKernel(LinearKernel):
    priority = 5
    invertible = True

    @classmethod
    def can_implement(cls, req: KernelRequest):
        if req.act_bits != 8:
            return False, "runs W8A8 layers (int8 activations); this one keeps its activations in float"
        if not (req.bits == 8 and req.per_channel and req.symmetric):
            return False, "needs 8-bit symmetric weights with one scale per output channel"
        if not req.act_dtype.is_floating_point:
            return False, f"activations must be floating point, got {req.act_dtype}"
        return True, ""

    def __init__(self, qw: QuantizedWeight, req: KernelRequest):
        super().__init__(qw, req)
        self.scheme = qw.scheme
        self.weight = (qw.codes.int() - qw.scheme.sym_zero).to(torch.int8).contiguous()
        self.scale = qw.scales.float().view(1, -1).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        w, s = self.weight.to(x.device), self.scale.to(x.device)
        if torch.compiler.is_compiling() and x.device.type == "cpu":  # opaque to dynamo (vLLM's compiled mode)
            y = torch.ops.compress_export.w8a8_linear(x2, w, s)
        else:
            y = w8a8_linear(x2, w, s)
        return y.view(*lead, -1)

    def quantized_weight(self) -> QuantizedWeight:
        codes = (self.weight.int() + self.scheme.sym_zero).to(torch.uint8).contiguous()
        out_f, in_f = codes.shape
        zeros = torch.full((out_f, 1), self.scheme.sym_zero, dtype=torch.int32)
        return QuantizedWeight(
            codes, self.scale.view(-1, 1).clone(), zeros, torch.zeros(in_f, dtype=torch.int32), self.scheme
        )

    def tensors(self) -> dict:
        return {"weight": self.weight, "scale": self.scale}


def _register_op() -> None:
    @torch.library.custom_op("compress_export::w8a8_linear", mutates_args=())
    def _op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x.contiguous(), weight, scale)

    @_op.register_fake
    def _(x, weight, scale):
        return x.new_empty(x.shape[0], weight.shape[0])


_register_op()
