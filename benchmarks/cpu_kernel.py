"""Micro benchmark: the CPU 4-bit kernel (`cpu-wna16`) against torch.nn.functional.linear in bf16 and fp32, with
PyTorch's tinygemm (`_weight_int4pack_mm_for_cpu`) and, where this vLLM build has it (AVX-512 wheels), vLLM's own
`cpu_gemm_wna16` beside them. Median of --repeats timed calls per cell (after warm-up), all in one run.

  python benchmarks/cpu_kernel.py [--shapes smollm2,8b] [--rows 1,4,16,128,512] [--repeats 20] [--group 128]

"ours" is the path the registry runs at that M: the int16 decode kernel below 8 rows, the W4A8 integer prefill
(COMPRESS_EXPORT_PREFILL=int8, the default) from 8; "ours exact" is the float prefill (dequantized tiles into
torch's GEMM, COMPRESS_EXPORT_PREFILL=float) at the same M, for the prefill rows.

Shapes are out×in of one linear: SmolLM2-135M's (q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536) and
Llama-3-8B's (4096×4096, 14336×4096, 4096×14336). Random 4-bit codes, asymmetric, group 64 for SmolLM2 (576 is
not a multiple of 128) and --group for 8B. Prints a table of milliseconds and ratios (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import timed

from compress_export.core.hardware import cpu_kind
from compress_export.core.result import QuantizedWeight
from compress_export.core.scheme import Scheme
from compress_export.kernels import cpu_wna16 as ck
from compress_export.kernels.base import KernelRequest

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "8b": [(4096, 4096), (14336, 4096), (4096, 14336)],
}


def random_weight(out_f, in_f, group) -> QuantizedWeight:
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    G = in_f // group
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, G, generator=g) * 0.01 + 1e-3).half().float()
    zeros = torch.randint(0, 16, (out_f, G), generator=g, dtype=torch.int32)
    return QuantizedWeight(
        codes, scales, zeros, torch.arange(in_f, dtype=torch.int32) // group, Scheme(4, group, False)
    )


def tinygemm(qw: QuantizedWeight):
    """PyTorch's int4 CPU kernel: w = (q − 8)·s + zero with a float zero, so our zero point z is (8 − z)·s."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.int(), 1)
    sz = torch.stack([qw.scales.t(), ((8 - qw.zeros.float()) * qw.scales).t()], -1).bfloat16().contiguous()
    gs = qw.scheme.group_size
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, sz)


def vllm_wna16(qw: QuantizedWeight):
    """vLLM's own CPU WNA16 kernel, prepared by vLLM's own code from a GPTQ-format layer; None where the op is
    missing (AVX2 wheels) or vLLM is not installed."""
    try:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            return None
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
        from vllm.scalar_type import scalar_types

        from compress_export.formats.base import FORMATS
        from compress_export.integrations.vllm_method import _make_param
    except Exception:  # noqa: BLE001
        return None
    fmt = FORMATS.get("gptq")()
    out_f, in_f = qw.shape
    layer = torch.nn.Module()
    packed = fmt.pack(qw)
    for name, spec in fmt.tensor_layout(qw.scheme, in_f, out_f).items():
        p = _make_param(spec, None)
        p.data.copy_(packed[name])
        layer.register_parameter(name, p)
    layer.bias = None
    cfg = MPLinearLayerConfig(
        (in_f, out_f), (in_f, out_f), scalar_types.uint4, torch.bfloat16, qw.scheme.group_size, True
    )
    kernel = CPUWNA16LinearKernel(cfg, "qweight", "scales", "qzeros")
    kernel.process_weights_after_loading(layer)
    return lambda x: kernel.apply_weights(layer, x)


def row(out_f, in_f, group, m, repeats) -> dict:
    qw = random_weight(out_f, in_f, group)
    w32 = qw.dequantize(torch.float32)
    w16 = w32.bfloat16()
    ours = ck.CpuWNA16Kernel(qw, KernelRequest.for_weight(qw, torch.float32, "cpu"))
    x32 = torch.randn(m, in_f)
    x16 = x32.bfloat16()
    r = {
        "shape": f"{out_f}x{in_f}",
        "M": m,
        "path": ck.prefill_path(m),
        "ours_fp32": timed(lambda: ours(x32), repeats),
        "ours_bf16": timed(lambda: ours(x16), repeats),
        "linear_bf16": timed(lambda: torch.nn.functional.linear(x16, w16), repeats),
        "linear_fp32": timed(lambda: torch.nn.functional.linear(x32, w32), repeats),
    }
    r["ours_exact_fp32"] = None
    if r["path"] == "w4a8":
        os.environ["COMPRESS_EXPORT_PREFILL"] = "float"
        try:
            r["ours_exact_fp32"] = timed(lambda: ours(x32), repeats)
        finally:
            os.environ.pop("COMPRESS_EXPORT_PREFILL")
    for name, make in (("tinygemm_bf16", tinygemm), ("vllm_wna16_bf16", vllm_wna16)):
        fn = make(qw)
        r[name] = timed(lambda: fn(x16), repeats) if fn is not None else None
    r["vs_bf16"] = r["linear_bf16"] / r["ours_bf16"]
    r["vs_fp32"] = r["linear_fp32"] / r["ours_fp32"]
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2,8b")
    p.add_argument("--rows", default="1,4,16,128,512")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--group", type=int, default=128, help="group size for the 8B shapes")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    if ck.extension() is None:
        raise SystemExit(ck.extension_error())
    print(f"# {cpu_kind()} CPU, {torch.get_num_threads()} threads, kernel path {ck.isa()}, torch {torch.__version__}")
    rows = []
    for family in a.shapes.split(","):
        for out_f, in_f in SHAPES[family]:
            group = 64 if family == "smollm2" else a.group
            for m in map(int, a.rows.split(",")):
                rows.append(row(out_f, in_f, group, m, a.repeats))
                print(
                    json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True
                )
    cols = [
        "ours_fp32",
        "ours_bf16",
        "ours_exact_fp32",
        "linear_bf16",
        "linear_fp32",
        "tinygemm_bf16",
        "vllm_wna16_bf16",
    ]
    print(
        "\n| shape (out×in) | M | path | "
        + " | ".join(c.replace("_", " ") + " ms" for c in cols)
        + " | ours vs bf16 | ours vs fp32 |"
    )
    print("|---|---|---|" + "---|" * (len(cols) + 2))
    for r in rows:
        cells = [f"{r[c]:.3f}" if r[c] is not None else "–" for c in cols]
        print(
            f"| {r['shape']} | {r['M']} | {r['path']} | "
            + " | ".join(cells)
            + f" | {r['vs_bf16']:.2f}× | {r['vs_fp32']:.2f}× |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
