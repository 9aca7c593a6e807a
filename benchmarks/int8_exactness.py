"""Is vLLM's CPU int8 GEMM exact here, and how fast is ours? vLLM's oneDNN W8A8 GEMM against the exact integer
product, against a model of a saturating int16 pair sum, and our compiled exact GEMM (kernels/csrc/cpu_int8.c)
against it and against torch's fp32/fp64 matmuls.

  python benchmarks/int8_exactness.py [--repeats 20]

Part 1, exactness. The same int8 operands go to vLLM's oneDNN handler (the calls of its
CPUInt8ScaledMMLinearKernel: create_onednn_scaled_mm, onednn_scaled_int8_quant, onednn_scaled_mm) and to a float64
matmul (exact: every sum is an integer far below 2^53). "saturating model" is x shifted to u8 by +128, each
adjacent pair of u8 × s8 products added in a saturating int16 (vpmaddubsw, AVX2 without VNNI), minus 128·Σw: the
share of outputs it reproduces bit for bit says whether that is what the CPU did. Operands: "full range" uniform
int8; "gaussian" per-token / per-channel quantized Gaussians (most codes small, as in a model).
Part 2, speed: ms per linear y = x [M, K] · W [N, K]ᵀ for decode (M = 1), a small batch (16) and prefill (512),
on SmolLM2's and a 1B Llama's MLP shapes, with torch's thread count for everything: ours and oneDNN include the
per-token quantization of x (ours also both scales: kernels/int8.w8a8_linear); "torch fp32" is the unquantized
model's linear, "torch fp64" the exact fallback used where the compiled kernel is not built.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vLLM is imported: its CPU platform, its AVX2/512 ops

import torch  # noqa: E402
from common import timed  # noqa: E402

from compress_export.core.hardware import cpu_kind, saturating_int8_gemm  # noqa: E402
from compress_export.kernels.int8 import extension, w8a8_linear  # noqa: E402


def saturating_model(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    u = xq.long() + 128
    m, n = u.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=torch.long)
    for i in range(m):  # one token at a time keeps the [n, k] product small
        pairs = (u[i][None] * w.long()).view(n, -1, 2).sum(-1).clamp(-32768, 32767)
        out[i] = pairs.sum(-1) - 128 * w.long().sum(1)
    return out


class OneDNN:
    """vLLM's CPU int8 GEMM, called as its CPUInt8ScaledMMLinearKernel calls it (dynamic, symmetric)."""

    def __init__(self, w: torch.Tensor):
        from vllm import _custom_ops as ops

        self.ops, self.w, self.scale = ops, w, torch.ones(w.shape[0], 1)  # the handler keeps pointers to both
        self.h = ops.create_onednn_scaled_mm(w.t(), self.scale, torch.float32, True, False, 32)

    def __call__(self, x: torch.Tensor):
        xq, xs, azp = self.ops.onednn_scaled_int8_quant(x, None, None, True)
        out = torch.empty(x.shape[0], self.w.shape[0])
        self.ops.onednn_scaled_mm(self.h, xq, out, xs, azp, None, None)
        return out, xq, xs


def operands(kind: str, m: int, k: int, n: int, g: torch.Generator):
    if kind == "full range":
        x = torch.randint(-127, 128, (m, k), generator=g).float()
        x[:, 0] = 127  # a per-token scale of exactly 1: the quantized x is x itself
        w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
        return x, w
    x = torch.randn(m, k, generator=g)
    wf = torch.randn(n, k, generator=g)
    w = torch.round(wf / (wf.abs().amax(1, keepdim=True) / 127)).to(torch.int8)
    return x, w


def exactness(shapes) -> None:
    print("| operands | M×K×N | relative error (Frobenius) | outputs exact | saturating model reproduces |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for kind in ("full range", "gaussian"):
        for m, k, n in shapes:
            x, w = operands(kind, m, k, n, g)
            out, xq, xs = OneDNN(w)(x)
            acc = torch.round(out.double() / xs.double())
            exact = xq.double() @ w.double().t()
            sat = saturating_model(xq, w).double()
            err = float((acc - exact).norm() / exact.norm())
            print(
                f"| {kind} | {m}×{k}×{n} | {err:.2e} | {float((acc == exact).double().mean()):.1%} | "
                f"{float((acc == sat).double().mean()):.1%} |"
            )


def ms(f, repeats: int) -> float:
    return timed(f, repeats, warmup=1)


def speed(shapes, repeats: int) -> None:
    print("\n| M×K×N | ours (exact int8) | vLLM oneDNN int8 | torch fp32 | torch fp64 | oneDNN / ours | fp32 / ours |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for m, k, n in shapes:
        x, w = operands("gaussian", m, k, n, g)
        scale = torch.ones(1, n)
        dnn = OneDNN(w)
        wf, wd = w.float().t().contiguous(), w.double().t().contiguous()
        t = {
            "ours": ms(lambda: w8a8_linear(x, w, scale), repeats),
            "onednn": ms(lambda: dnn(x), repeats),
            "f32": ms(lambda: x @ wf, repeats),
            "f64": ms(lambda: x.double() @ wd, repeats),
        }
        print(
            f"| {m}×{k}×{n} | {t['ours']:.3f} | {t['onednn']:.3f} | {t['f32']:.3f} | {t['f64']:.3f} | "
            f"{t['onednn'] / t['ours']:.2f}× | {t['f32'] / t['ours']:.2f}× |"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    ext = extension()
    print(
        f"{cpu_kind()} CPU, {torch.get_num_threads()} threads; vLLM's int8 GEMM saturating here by the flags: "
        f"{saturating_int8_gemm()}; our GEMM: {ext.isa() if ext else 'not built (float64 fallback)'}\n"
    )
    exactness([(16, 576, 1536), (16, 1536, 576)])
    speed(
        [
            (1, 576, 1536),
            (1, 1536, 576),
            (16, 576, 1536),
            (512, 576, 1536),
            (1, 2048, 8192),
            (1, 8192, 2048),
            (512, 2048, 8192),
        ],
        a.repeats,
    )


if __name__ == "__main__":
    main()
