"""Low-rank error correction (EoRA) on top of GPTQ: perplexity by rank, adapter size, and what vLLM makes of it.

  python benchmarks/lowrank.py [--bits 3,2] [--ranks 0,16,64] [--vllm 3:64] [--num-samples 64 --seq-len 512]
                               [--no-lora-ppl] [--fused-only] [--rounds 1] [--out benchmarks/results/lowrank.json]
  python benchmarks/lowrank.py --kernel          # the fused kernel alone, per linear, against two torch GEMMs

SmolLM2-135M-Instruct, GPTQ W{bits} g64 (static act-order), calibrated on calib.txt (64 × 512 tokens unless
told), with a rank-r correction of every linear's error (`--lowrank-rank r`, a LoRA adapter in OUT/lowrank).
Perplexity on eval.txt by the shared protocol through our loader (fp32; it applies the adapter). The gap closed is
(ppl(rank 0) − ppl(rank r)) / (ppl(rank 0) − ppl(unquantized)).
For each --vllm BITS:RANK pair, the export is also served by vLLM (plugin kernel for the 3/2-bit base) three ways:
the adapter as a LoRA, the correction fused into our plugin's linears (COMPRESS_EXPORT_LOWRANK=fused,
integrations/vllm_lowrank.py, kernels/lowrank.py), and the base alone: perplexity from its prompt log-probabilities
(the LoRA run scores one window at a time, about 10 minutes here; --no-lora-ppl skips it), and batch-1 decode
tokens/s (64 tokens, median of 3). `fused_ratio` is fused decode / the same export's decode without the
correction (target ≥ 0.8). --fused-only serves just those two (and the fused perplexity), alternating them
--rounds times and keeping each one's best, so a busy machine hurts both alike.

Quick check (about 5 minutes on two cores):
  python benchmarks/lowrank.py --bits 3 --ranks 64 --num-samples 16 --seq-len 256 --fused-only
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


def served(d: Path, rank: int, lora_ppl: bool = True, fused_only: bool = False, rounds: int = 1) -> dict:
    lora = d / "lowrank" if rank else None
    out = {}
    if not fused_only:
        with lowrank_mode("lora"):
            if lora_ppl or not lora:
                out["vllm_ppl"] = vllm_ppl(d, lora)
            out["decode_tok_s"] = decode(d, out, *(["--lora", lora] if lora else []))
    if lora:
        with lowrank_mode("fused"):
            out["vllm_ppl_fused"] = vllm_ppl(d)
        base, fused = [], []
        for _ in range(rounds):  # alternated: a load that comes and goes falls on both
            with lowrank_mode("lora"):
                base.append(decode(d, out))
            with lowrank_mode("fused"):
                fused.append(decode(d, out))
        out["decode_tok_s_no_adapter"] = best(base)
        out["decode_tok_s_fused"] = best(fused)
        if all(isinstance(v, float) for v in (out["decode_tok_s_no_adapter"], out["decode_tok_s_fused"])):
            out["fused_ratio"] = round(out["decode_tok_s_fused"] / out["decode_tok_s_no_adapter"], 3)
    return out


def best(runs: list):
    """The fastest of the runs that worked (tokens/s), else the first error."""
    ok = [r for r in runs if isinstance(r, (int, float))]
    return float(max(ok)) if ok else runs[0]


def kernel_bench(threads: int = 0, layers: int = 30) -> None:
    """µs per call of one linear's correction at SmolLM2's shapes (rank 64 per part, k corrected too), by rows of x:
    the C kernel, the torch path (two fp32 GEMMs per part on factors widened per call) and the plugin's previous
    path (fp32 stacked A and block-diagonal B, zero blocks included: two matmuls). The kernel's rows limit
    (kernels/lowrank.py KERNEL_MAX_ROWS) comes from here; the last line is the cost per decode token (M = 1)."""
    import torch

    from compress_export.kernels import lowrank as lk

    if threads:
        torch.set_num_threads(threads)
    shapes = {"qkv": (576, [576, 192, 192]), "o": (576, [576]), "gate_up": (576, [1536, 1536]), "down": (1536, [576])}
    print(f"{cpu_kind()} CPU, {torch.get_num_threads()} threads; rank 64 per part, fp16 factors, fp32 x/y; µs/call")
    print("| linear | M | kernel | torch | block-diagonal fp32 | torch / kernel |\n|---|---|---|---|---|---|")
    per_token = [0.0, 0.0]
    for name, (K, sizes) in shapes.items():
        g = torch.Generator().manual_seed(0)
        blocks, col = [], 0
        for n in sizes:
            blocks.append((col, torch.randn(64, K, generator=g) * 0.05, torch.randn(n, 64, generator=g) * 0.05))
            col += n
        f = lk.pack(name, blocks, col, K)
        A = torch.cat([a for _, a, _ in blocks])
        B = torch.block_diag(*[b for _, _, b in blocks])
        for m in (1, 4, 8, 16, 32, 64):
            x, y = torch.randn(m, K), torch.zeros(m, col)
            t_k = timed(lambda: kernel_call(lk, x, y, f))
            t_t = timed(lambda: lk.torch_apply_(x, y, f))
            t_b = timed(lambda: y + (x @ A.t() @ B.t()))
            if m == 1:
                per_token = [per_token[0] + t_k * layers, per_token[1] + t_b * layers]
            print(f"| {name} | {m} | {t_k:.1f} | {t_t:.1f} | {t_b:.1f} | {t_t / t_k:.2f} |", flush=True)
    print(
        f"\nper decode token ({layers} layers, M = 1): kernel {per_token[0] / 1e3:.2f} ms, "
        f"block-diagonal fp32 {per_token[1] / 1e3:.2f} ms"
    )


def kernel_call(lk, x, y, f):
    old, lk.KERNEL_MAX_ROWS = lk.KERNEL_MAX_ROWS, 1 << 30  # the kernel at every M
    try:
        lk.apply_(x, y, f)
    finally:
        lk.KERNEL_MAX_ROWS = old


def timed(fn, budget_s: float = 0.3) -> float:
    """Fastest µs per call over batches of calls (after a warm-up), within about budget_s: the least disturbed
    batch, since on a shared machine other work only ever adds time."""
    fn()
    t0 = time.perf_counter()
    fn()
    n = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-7)))
    runs = []
    end = time.perf_counter() + budget_s
    while len(runs) < 5 or (time.perf_counter() < end and len(runs) < 50):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return min(runs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="3,2")
    p.add_argument("--ranks", default="0,16,64")
    p.add_argument("--vllm", default="3:64", help="BITS:RANK pairs also served by vLLM (comma-separated; '' none)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows of calib.txt")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens")
    p.add_argument("--no-lora-ppl", action="store_true", help="skip vLLM's perplexity with the adapter as a LoRA")
    p.add_argument("--fused-only", action="store_true", help="in vLLM, serve only the base and the fused correction")
    p.add_argument("--rounds", type=int, default=1, help="alternated base/fused decode runs (best of each)")
    p.add_argument("--kernel", action="store_true", help="only time the fused kernel against torch, per linear")
    p.add_argument("--threads", type=int, default=0, help="--kernel: torch/OpenMP threads (default: torch's)")
    p.add_argument("--out")
    a = p.parse_args()
    if a.kernel:
        return kernel_bench(a.threads)
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
                    rec.update(served(out, rank, not a.no_lora_ppl, a.fused_only, a.rounds))
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
        "fused_ratio",
    ]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
