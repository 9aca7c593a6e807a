"""Micro benchmark: the 2:4 CPU kernel (`cpu-sparse24`) against a dense linear, one layer at a time.

  python benchmarks/sparse24_kernel.py [--shapes smollm2,8b] [--rows 1,4,16] [--repeats 20] [--dtype float32] [--threads N]

Shapes are out×in of one linear: SmolLM2-135M's (q/o 576×576, gate/up 1536×576, down 576×1536) and Llama-3-8B's
(4096×4096, 14336×4096, 4096×14336). A random 2:4-pruned weight (magnitude of random scores) runs as:
- `dense fp32`, `dense bf16`: torch.nn.functional.linear on the dense pruned weight (what the `dense` kernel does);
- `s24`: cpu-sparse24 with bf16 values (what a 2:4 export with bf16 values loads as);
- `wna16`: cpu-wna16 on the dense 4-bit codes of a 2:4 + W4 g64 weight (what ran 2:4 + W4 before cpu-sparse24);
- `s24-w4`: cpu-sparse24 on the same 2:4 + W4 g64 weight.
x is --dtype (fp32 or bf16). Fastest of --repeats timed calls per cell after warm-up (the least disturbed by other
load on a shared machine); prints milliseconds and each sparse kernel's speed-up over the faster dense linear
(> 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import timed

from compress_export.core.hardware import cpu_kind
from compress_export.core.result import QuantizedWeight, SparseWeight
from compress_export.core.scheme import Scheme
from compress_export.core.sparsity import Sparsity, nm_mask
from compress_export.kernels.base import KernelRequest
from compress_export.kernels.cpu_sparse24 import CpuSparse24Kernel
from compress_export.kernels.cpu_wna16 import CpuWNA16Kernel

SHAPES = {
    "smollm2": [(576, 576), (1536, 576), (576, 1536)],
    "8b": [(4096, 4096), (14336, 4096), (4096, 14336)],
}
GROUP = 64


def weights(out_f: int, in_f: int):
    """A float 2:4 weight (values exact in bf16) and a 2:4 + W4 g64 one (pruned codes at their zero point)."""
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    mask = nm_mask(torch.rand(out_f, in_f, generator=g), 2, 4)
    w = (torch.randn(out_f, in_f, generator=g) * 0.02 * mask).bfloat16().float()
    G = in_f // GROUP
    zeros = torch.randint(0, 16, (out_f, G), generator=g, dtype=torch.int32)
    g_idx = torch.arange(in_f, dtype=torch.int32) // GROUP
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    codes = torch.where(mask, codes, zeros[:, g_idx.long()].to(torch.uint8))
    scales = (torch.rand(out_f, G, generator=g) * 0.01 + 1e-3).half().float()
    qw = QuantizedWeight(codes, scales, zeros, g_idx, Scheme(4, GROUP, False), mask=mask)
    return SparseWeight(w, mask, Sparsity(2, 4)), qw


def row(out_f: int, in_f: int, m: int, dtype, repeats: int) -> dict:
    sw, qw = weights(out_f, in_f)
    x = torch.randn(m, in_f).to(dtype)
    cells = {}
    for name, wd in (("dense fp32", torch.float32), ("dense bf16", torch.bfloat16)):
        w, xd = sw.values.to(wd), x.to(wd)
        cells[name] = timed(lambda: torch.nn.functional.linear(xd, w), repeats, warmup=5, stat=min)
    for name, cls, weight in (
        ("s24", CpuSparse24Kernel, sw),
        ("wna16", CpuWNA16Kernel, qw),
        ("s24-w4", CpuSparse24Kernel, qw),
    ):
        req = KernelRequest.for_weight(weight, dtype, "cpu")
        kernel = cls(weight, req)
        cells[name] = timed(lambda: kernel(x), repeats, warmup=5, stat=min)
    return cells


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm2,8b")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    print(
        f"# {cpu_kind()}, torch {torch.__version__}, {torch.get_num_threads()} threads, x {a.dtype}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    cols = ["dense fp32", "dense bf16", "s24", "wna16", "s24-w4"]
    print(
        f"{'shape':>12} {'M':>3} "
        + " ".join(f"{c:>10}" for c in cols)
        + "   s24×  wna16×  s24-w4×  (ms; × vs best dense)"
    )
    for key in a.shapes.split(","):
        for out_f, in_f in SHAPES[key]:
            for m in (int(r) for r in a.rows.split(",")):
                c = row(out_f, in_f, m, dtype, a.repeats)
                best = min(c["dense fp32"], c["dense bf16"])
                ratios = [best / c[k] for k in ("s24", "wna16", "s24-w4")]
                print(
                    f"{out_f:>5}x{in_f:<6} {m:>3} "
                    + " ".join(f"{c[k]:>10.3f}" for k in cols)
                    + "   "
                    + "  ".join(f"{r:5.2f}" for r in ratios)
                )
                print(json.dumps({"shape": [out_f, in_f], "M": m, "dtype": a.dtype, **c}), flush=True)


if __name__ == "__main__":
    main()
