"""Run by tests/test_moe.py in a subprocess: our vLLM MoE method's experts loaded as tensor-parallel shards.

Each rank of TP builds the method with vLLM's MoE parallel config for its rank (in one process, no engine), loads
every expert's full checkpoint tensors through the method's own weight loader (as vLLM's model loader calls it),
and runs the routing; vLLM's runner all-reduces the ranks' outputs, so their sum must equal the MoE layer computed
from the in-memory results before they were packed. GPTQ, AWQ and compressed-tensors; grouped, per-channel,
symmetric and asymmetric; act-order and words straddling two ranks refused. Prints one JSON line: {case: {"max_err": ..., "scale": ...}} or {case: {"error": ...}}.
"""

import json
import sys
from types import SimpleNamespace

import torch

from compress_export.core.scheme import Scheme
from compress_export.formats.base import FORMATS
from compress_export.integrations.vllm_method import CompressExportConfig
from compress_export.integrations.vllm_moe import _MoEMethod
from compress_export.math.quant import rtn_quantize

TP, EXPERTS, HIDDEN, INTER, TOP_K = 2, 4, 128, 256, 2
CASES = [
    ("gptq", Scheme(4, 32, True)),
    ("gptq", Scheme(4, -1, True)),
    ("gptq", Scheme(4, 64, True, "static")),
    ("compressed-tensors", Scheme(4, 32, False)),
    ("compressed-tensors", Scheme(8, -1, True)),
    ("awq", Scheme(4, 32, False)),
    ("gptq", Scheme(4, 32, True, "group")),  # act-order: refused, its groups do not split
    ("compressed-tensors", Scheme(3, 32, True)),  # 10 codes a word: 128 inputs a rank end mid-word, refused
]


def rank_output(fmt, qcfg, experts, rank, x, ids, weights):
    method = _MoEMethod.__new__(_MoEMethod)
    method.moe = SimpleNamespace(
        moe_parallel_config=SimpleNamespace(tp_size=TP, tp_rank=rank, ep_size=1),
        activation=SimpleNamespace(value="silu"),
        is_act_and_mul=True,
    )
    _MoEMethod.__init__(method, CompressExportConfig(qcfg), "model.layers.0.mlp.experts")
    layer = torch.nn.Module()
    layer._map_global_expert_id_to_local_expert_id = lambda e: e
    method.create_weights(layer, EXPERTS, HIDDEN, INTER // TP, torch.float32)
    for e, projections in enumerate(experts):
        for shard, qw in zip(("w1", "w3", "w2"), projections):
            for suffix, t in fmt.pack(qw).items():
                param = getattr(layer, f"{'w2' if shard == 'w2' else 'w13'}_{suffix}")
                param.weight_loader(param, t.clone(), f"experts.{e}.{shard}.{suffix}", shard, e)
    method.process_weights_after_loading(layer)
    return method.apply(layer, x, weights, ids)


def main():
    torch.manual_seed(0)
    x = torch.randn(5, HIDDEN)
    ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(x.shape[0])])
    weights = torch.rand(x.shape[0], TOP_K)
    shapes = ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))
    results = {}
    for fmt_name, scheme in CASES:
        case = (
            f"{fmt_name}-w{scheme.bits}g{scheme.group_size}-{'sym' if scheme.symmetric else 'asym'}-{scheme.act_order}"
        )
        try:
            fmt = FORMATS.get(fmt_name)()
            experts = [[rtn_quantize(torch.randn(*s) * 0.05, scheme) for s in shapes] for _ in range(EXPERTS)]
            want = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for k in range(TOP_K):
                    gate, up, down = (q.dequantize(torch.float32) for q in experts[int(ids[t, k])])
                    h = torch.nn.functional.silu(x[t] @ gate.T) * (x[t] @ up.T)
                    want[t] += weights[t, k] * (h @ down.T)
            qcfg = fmt.quantization_config(scheme, [], {})
            got = sum(rank_output(fmt, qcfg, experts, r, x, ids, weights) for r in range(TP))
            results[case] = {"max_err": float((got - want).abs().max()), "scale": float(want.abs().max())}
        except Exception as e:  # reported per case, so one failure does not hide the others
            results[case] = {"error": f"{type(e).__name__}: {e}"[:400]}
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
