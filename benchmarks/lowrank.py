"""Low-rank error correction (EoRA) on top of GPTQ: perplexity by rank, adapter size, and what vLLM makes of it.

  python benchmarks/lowrank.py [--bits 3,2] [--ranks 0,16,64] [--vllm 3:64] [--num-samples 64 --seq-len 512]
                               [--no-lora-ppl] [--out benchmarks/results/lowrank.json]

SmolLM2-135M-Instruct, GPTQ W{bits} g64 (static act-order), calibrated on calib.txt (64 × 512 tokens unless
told), with a rank-r correction of every linear's error (`--lowrank-rank r`, a LoRA adapter in OUT/lowrank).
Perplexity on eval.txt by the shared protocol through our loader (fp32; it applies the adapter). The gap closed is
(ppl(rank 0) − ppl(rank r)) / (ppl(rank 0) − ppl(unquantized)).
For each --vllm BITS:RANK pair, the export is also served by vLLM (plugin kernel for the 3/2-bit base) three ways:
the adapter as a LoRA, the correction fused into our plugin's linears (COMPRESS_EXPORT_LOWRANK=fused,
integrations/vllm_lowrank.py), and the base alone: perplexity from its prompt log-probabilities (the LoRA run scores
one window at a time, about 10 minutes here; --no-lora-ppl skips it), and batch-1 decode tokens/s (64 tokens,
median of 3).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from common import TEXT, cli, example_model, size_mb, vllm_check

from compress_export.core.hardware import cpu_kind


def adapter_mb(d: Path) -> float:
    f = d / "lowrank" / "adapter_model.safetensors"
    return round(f.stat().st_size / 1e6, 1) if f.exists() else 0.0


@contextmanager
def lowrank_mode(mode: str):
    """vLLM subprocesses started inside see COMPRESS_EXPORT_LOWRANK=mode (lora or fused), whatever the shell has."""
    old = os.environ.get("COMPRESS_EXPORT_LOWRANK")
    os.environ["COMPRESS_EXPORT_LOWRANK"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["COMPRESS_EXPORT_LOWRANK"]
        else:
            os.environ["COMPRESS_EXPORT_LOWRANK"] = old


def vllm_ppl(d: Path, lora=None) -> float:
    from compress_export.integrations.validate import vllm_perplexity

    res = vllm_perplexity(d, TEXT / "eval.txt", 512, 16, progress=False, lora=lora)
    return round(res["perplexity"]["token_perplexity"], 3)


def decode(d: Path, out: dict, *extra):
    """Batch-1 decode tokens/s (or the error's tail), and the kernels that ran, into `out`."""
    r = vllm_check(d, "--max-tokens", 64, "--repeats", 3, *extra)
    out.setdefault("kernels", r.get("kernels"))
    return r.get("decode_tok_s_by_batch", {}).get("1", r.get("error", "")[-200:])


def served(d: Path, rank: int, lora_ppl: bool = True) -> dict:
    lora = d / "lowrank" if rank else None
    out = {}
    with lowrank_mode("lora"):
        if lora_ppl or not lora:
            out["vllm_ppl"] = vllm_ppl(d, lora)
        out["decode_tok_s"] = decode(d, out, *(["--lora", lora] if lora else []))
        if lora:
            out["decode_tok_s_no_adapter"] = decode(d, out)
    if lora:
        with lowrank_mode("fused"):
            out["vllm_ppl_fused"] = vllm_ppl(d)
            out["decode_tok_s_fused"] = decode(d, out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="3,2")
    p.add_argument("--ranks", default="0,16,64")
    p.add_argument("--vllm", default="3:64", help="BITS:RANK pairs also served by vLLM (comma-separated; '' none)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows of calib.txt")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens")
    p.add_argument("--no-lora-ppl", action="store_true", help="skip vLLM's perplexity with the adapter as a LoRA")
    p.add_argument("--out")
    a = p.parse_args()
    base = Path(example_model())
    serve = {tuple(int(v) for v in pair.split(":")) for pair in a.vllm.split(",") if pair}
    calib = ["--dataset", TEXT / "calib.txt", "--num-samples", a.num_samples, "--seq-len", a.seq_len]
    ref = round(cli("eval", base, "--text", TEXT / "eval.txt")["token_perplexity"], 3)
    rows = [{"bits": 16, "rank": 0, "token_ppl": ref, "size_mb": size_mb(base)}]
    print(json.dumps(rows[0]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in a.bits.split(",")):
            for rank in (int(r) for r in a.ranks.split(",")):
                t = time.time()
                out = Path(tmp) / f"w{bits}-r{rank}"
                s = cli(
                    "--format",
                    "gptq",
                    "--method",
                    "gptq",
                    "--bits",
                    bits,
                    "--group-size",
                    64,
                    "--lowrank-rank",
                    rank,
                    *calib,
                    base,
                    "-o",
                    out,
                    "-q",
                )
                ev = cli("eval", out, "--text", TEXT / "eval.txt")
                rec = {
                    "bits": bits,
                    "rank": rank,
                    "token_ppl": round(ev["token_perplexity"], 3),
                    "word_ppl": round(ev["word_perplexity"], 1),
                    "size_mb": size_mb(out),
                    "adapter_mb": adapter_mb(out),
                    "compress_s": round(s["seconds"], 1),
                }
                if (bits, rank) in serve:
                    rec.update(served(out, rank, not a.no_lora_ppl))
                rows.append(rec)
                print(json.dumps(rec), f"({time.time() - t:.0f} s wall)", flush=True)
    zero = {r["bits"]: r["token_ppl"] for r in rows if r["rank"] == 0 and r["bits"] != 16}
    for r in rows:
        if r["bits"] in zero and r["rank"]:
            r["gap_closed"] = f"{(zero[r['bits']] - r['token_ppl']) / (zero[r['bits']] - ref):.0%}"
    print(
        f"\n{cpu_kind()} CPU; SmolLM2-135M GPTQ g64, {a.num_samples}×{a.seq_len} calibration tokens; eval.txt 16×512\n"
    )
    cols = [
        "bits",
        "rank",
        "token_ppl",
        "gap_closed",
        "word_ppl",
        "size_mb",
        "adapter_mb",
        "compress_s",
        "vllm_ppl",
        "vllm_ppl_fused",
        "decode_tok_s",
        "decode_tok_s_fused",
        "decode_tok_s_no_adapter",
    ]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
