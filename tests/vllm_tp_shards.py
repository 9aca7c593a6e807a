"""Run by tests/test_vllm.py in a subprocess: our vLLM method's weights loaded as tensor-parallel shards.

vLLM's own parameter classes shard each checkpoint tensor as a tensor-parallel engine would (their tp rank and
size patched, rank by rank, in one process); each rank's layer output must equal that rank's slice of the whole
linear, computed from the in-memory result before it was packed. Row-parallel (input split) and column-parallel
(output split), per-channel, grouped, static and act-order, GPTQ, AWQ and compressed-tensors. Prints one JSON line:
{case: {"max_err": ..., "kernels": [...]}} or {case: {"error": ...}}.
"""

import json
import sys

import torch
import vllm.model_executor.parameter as vparam

from compress_export.core.scheme import Scheme
from compress_export.formats.base import FORMATS
from compress_export.integrations.vllm_method import CompressExportConfig, CompressExportLinearMethod
from compress_export.math.sweep import gptq_quantize

TP = 2
OUT, IN = 128, 512
CASES = [
    ("gptq", Scheme(4, 64, True, "group")),
    ("gptq", Scheme(4, -1, True, "none")),
    ("gptq", Scheme(4, 64, True, "static")),
    ("gptq", Scheme(8, -1, True, "group")),
    ("compressed-tensors", Scheme(4, 64, True, "group")),
    ("compressed-tensors", Scheme(4, -1, True, "none")),
    ("compressed-tensors", Scheme(4, 64, False, "none")),
    ("awq", Scheme(4, 64, False, "none")),
]


def shard_run(fmt, qcfg, packed, rank, row_parallel, x):
    vparam.get_tensor_model_parallel_rank = lambda: rank
    vparam.get_tensor_model_parallel_world_size = lambda: TP
    layer = torch.nn.Module()
    method = CompressExportLinearMethod(CompressExportConfig(qcfg))
    in_p, out_p = (IN // TP, OUT) if row_parallel else (IN, OUT // TP)
    method.create_weights(layer, in_p, [out_p], IN, OUT, torch.float32, weight_loader=lambda *a: None)
    for name in layer.ce_tensor_names:
        if name in packed:
            param = getattr(layer, name)
            load = param.load_row_parallel_weight if row_parallel else param.load_column_parallel_weight
            load(packed[name].clone())
    method.process_weights_after_loading(layer)
    return method.apply(layer, x), layer.ce_kernel_name


def main():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN) * 0.05
    X = torch.randn(1024, IN) * torch.linspace(0.1, 3.0, IN)
    H = 2 * X.T @ X / X.shape[0]
    x = torch.randn(3, IN)
    results = {}
    for fmt_name, scheme in CASES:
        fmt = FORMATS.get(fmt_name)()
        qw = gptq_quantize(W, H, scheme, min_zero=fmt.min_zero if not scheme.symmetric else 0)
        full = qw.dequantize()
        packed = fmt.pack(qw)
        qcfg = fmt.quantization_config(scheme, [], {})
        for row_parallel in (True, False):
            case = f"{fmt_name}-w{scheme.bits}g{scheme.group_size}-{scheme.act_order}-" + (
                "row" if row_parallel else "column"
            )
            try:
                errs, kernels = [], []
                for rank in range(TP):
                    if row_parallel:
                        cols = slice(rank * IN // TP, (rank + 1) * IN // TP)
                        y, k = shard_run(fmt, qcfg, packed, rank, True, x[:, cols])
                        want = x[:, cols] @ full[:, cols].T
                    else:
                        rows = slice(rank * OUT // TP, (rank + 1) * OUT // TP)
                        y, k = shard_run(fmt, qcfg, packed, rank, False, x)
                        want = x @ full[rows].T
                    errs.append(float((y - want).abs().max()))
                    kernels.append(k)
                results[case] = {"max_err": max(errs), "kernels": kernels}
            except Exception as e:  # reported per case, so one failure does not hide the others
                results[case] = {"error": f"{type(e).__name__}: {e}"[:300]}
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
