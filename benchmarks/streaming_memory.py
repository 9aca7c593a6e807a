"""Peak memory of an export against model depth and size: the layer-streaming pipeline's claim, measured.

    python benchmarks/streaming_memory.py                 # hidden 2048, 12 and 48 layers, RTN and GPTQ
    python benchmarks/streaming_memory.py --llama3-8b     # Llama-3-8B shapes, bf16, RTN W4 g128 (needs ~25 GB disk)
    python benchmarks/streaming_memory.py --methods gptq-kd   # GPTQ + --recover kd (2 steps a layer: memory only)
    python benchmarks/streaming_memory.py --methods gptq-mixed   # GPTQ + --avg-bits 3.5 (mixed precision)
    python benchmarks/streaming_memory.py --experts 32 --hidden 1024 --inter 512 --depths 4 16   # Qwen3-MoE shapes

Random-weight Llamas are written shard by shard in bf16 (one decoder layer in memory at a time, so building
them needs little memory either), exported by `compress-export` in a fresh process each, and deleted afterwards.
Peak RSS is the exporting process's own (VmHWM on Linux, as the CLI's summary reports it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TEXT, cli

# Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 32 heads of 128, 8 KV heads, vocabulary 128256, untied head
LLAMA3_8B = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tie=False)


def build_random_llama(
    path: Path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool, experts=0
) -> Path:
    """A Llama checkpoint of random bf16 weights (std 0.02, norms 1), one shard per decoder layer plus an index.
    experts > 0: a Qwen3-MoE one instead, each MLP `experts` experts of width `inter`, top-2 routing, stored per
    expert as Qwen3-MoE checkpoints are (`mlp.experts.E.gate_proj.weight`, router `mlp.gate.weight`)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    head_dim = hidden // heads
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if experts:
        cfg.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            head_dim=head_dim,
            num_experts=experts,
            num_experts_per_tok=2,
            moe_intermediate_size=inter,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map, files = {}, []

    def shard(tensors):
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in tensors})

    shard({"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden).bfloat16()})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(
            {
                p + "input_layernorm.weight": torch.ones(hidden).bfloat16(),
                p + "post_attention_layernorm.weight": torch.ones(hidden).bfloat16(),
                p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
                **(_moe(p, rnd, hidden, inter, experts, head_dim) if experts else {}),
                **(
                    {}
                    if experts
                    else {
                        p + "mlp.gate_proj.weight": rnd(inter, hidden),
                        p + "mlp.up_proj.weight": rnd(inter, hidden),
                        p + "mlp.down_proj.weight": rnd(hidden, inter),
                    }
                ),
            }
        )
    if not tie:
        shard({"lm_head.weight": rnd(vocab, hidden)})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _tokenizer(path)
    return path


def _moe(p: str, rnd, hidden: int, inter: int, experts: int, head_dim: int) -> dict:
    """One Qwen3-MoE layer's tensors besides the Llama attention's: q/k norms, the router, every expert."""
    out = {
        p + "self_attn.q_norm.weight": torch.ones(head_dim).bfloat16(),
        p + "self_attn.k_norm.weight": torch.ones(head_dim).bfloat16(),
        p + "mlp.gate.weight": rnd(experts, hidden),
    }
    for e in range(experts):
        q = f"{p}mlp.experts.{e}."
        out.update(
            {
                q + "gate_proj.weight": rnd(inter, hidden),
                q + "up_proj.weight": rnd(inter, hidden),
                q + "down_proj.weight": rnd(hidden, inter),
            }
        )
    return out


def _tokenizer(path: Path) -> None:
    """The example model's tokenizer (SmolLM2's, 49152 ids: calibration text stays inside the vocabulary)."""
    from common import example_model
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(example_model()).save_pretrained(str(path))


def export(model: Path, out: Path, *args) -> dict:
    t = time.time()
    s = cli(model, "-o", out, "-q", *args)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "peak_rss_mb": round(s["peak_rss_mb"]),
        "seconds": round(time.time() - t, 1),
        "streamed": s["streamed"],
        "size_after_mb": round(s["size_after_mb"]),
    }


def depth_sweep(a) -> None:
    rows = []
    calib = ["--dataset", TEXT / "calib.txt", "--num-samples", str(a.samples), "--seq-len", str(a.seq_len)]
    methods = {
        "rtn": ["--method", "rtn", "--group-size", "128"],
        "gptq": ["--method", "gptq", "--group-size", "128", *calib],
        # recovery's own memory (teacher stream, targets, trained copies): its step count does not change it
        "gptq-kd": ["--method", "gptq", "--group-size", "128", *calib, "--recover", "kd", "--recover-steps", "2"],
        # mixed precision's measuring sweep (one more pass over the layers) and its allocation
        "gptq-mixed": ["--method", "gptq", "--group-size", "128", *calib, "--avg-bits", "3.5"],
    }
    methods = {k: v for k, v in methods.items() if k in a.methods}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        for depth in a.depths:
            t = time.time()
            m = build_random_llama(
                Path(tmp) / f"llama-{depth}",
                a.hidden,
                a.inter,
                depth,
                a.heads,
                a.kv_heads,
                a.vocab,
                tie=False,
                experts=a.experts,
            )
            size = sum(f.stat().st_size for f in m.glob("*.safetensors")) / 1e6
            print(f"built {depth} layers ({size:.0f} MB bf16) in {time.time() - t:.0f} s", file=sys.stderr)
            for name, args in methods.items():
                r = export(m, Path(tmp) / "out", *args)
                rows.append({"layers": depth, "method": name, "model_mb": round(size), **r})
                print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(m)
    moe = f" × {a.experts} experts (Qwen3-MoE, top-2)" if a.experts else ""
    print(f"\nhidden {a.hidden}, MLP {a.inter}{moe}, vocab {a.vocab}; calibration {a.samples}×{a.seq_len} tokens")
    print(f"{'layers':>6} {'method':>6} {'model MB':>9} {'peak RSS MB':>12} {'seconds':>8}")
    for r in rows:
        print(f"{r['layers']:>6} {r['method']:>6} {r['model_mb']:>9} {r['peak_rss_mb']:>12} {r['seconds']:>8}")
    for name in methods:
        rss = {r["layers"]: r["peak_rss_mb"] for r in rows if r["method"] == name}
        lo, hi = min(a.depths), max(a.depths)
        print(f"{name}: peak RSS {hi} layers / {lo} layers = {rss[hi] / rss[lo]:.3f} (target ≤ 1.15)")


def llama3_8b(a) -> None:
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        t = time.time()
        m = build_random_llama(Path(tmp) / "llama3-8b", **LLAMA3_8B)
        size = sum(f.stat().st_size for f in m.glob("*.safetensors")) / 1e9
        print(f"built Llama-3-8B shapes ({size:.1f} GB bf16) in {time.time() - t:.0f} s", file=sys.stderr)
        r = export(m, Path(tmp) / "out", "--method", "rtn", "--bits", "4", "--group-size", "128")
    print(
        f"Llama-3-8B shapes, random bf16 ({size:.1f} GB) → RTN W4 g128 GPTQ format ({r['size_after_mb']} MB): "
        f"peak RSS {r['peak_rss_mb']} MB (target < 6000), {r['seconds']} s, streamed={r['streamed']}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[12, 48])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)  # the example tokenizer's size
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq", "gptq-kd", "gptq-mixed"])
    p.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE model with this many experts a layer")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--llama3-8b", action="store_true", help="the 8B-shaped export instead of the depth sweep")
    p.add_argument("--tmp", default=None, help="where the random models are built (default: the system's tmp)")
    a = p.parse_args()
    llama3_8b(a) if a.llama3_8b else depth_sweep(a)


if __name__ == "__main__":
    main()
