"""The Python half of benchmarks/gpu_check.sh: build the two models, export each in every format, time them on the
GPU beside their fp16 original, and print one table. Run through the shell script, which prepares the environment.

  python benchmarks/gpu_check.py run --out DIR [--device cuda] [--deadline EPOCH] [--small]
  python benchmarks/gpu_check.py vllm-one MODEL_DIR [--dtype float16] [--small]   (one vLLM engine, one process)

Models: "smollm2" is SmolLM2-135M-Instruct built by `compress-export example-model` when its GGUF is in the cache
(COMPRESS_EXPORT_CACHE/wheels), else a stand-in of SmolLM2's exact shape and tokenizer with random weights (speed
does not depend on the weights' values; the table says which). "1b" is benchmarks/common.py's random 1.07 B Llama.

Two engines:
- hf: transformers, eager, our loader (AutoCompressedModelForCausalLM): the quantized linears run the kernel our
  registry chooses (cuda-wna16 on a GPU), and the kernel census says which. It runs wherever torch runs.
- vllm: `LLM(...)` offline, only where vLLM imports; vLLM's log line "Using <Kernel> for <Method>" and our
  plugin's "compress-export plugin claims/leaves vLLM" line say which kernel served each export.

Measures (greedy, ignore EOS, one warm-up first): decode tok/s at batch 1 and 16 (32-token prompt), prefill tok/s
(4 × 512-token prompts, one forward, median of 3), and on the GPU each distinct quantized linear shape of the 1B
GPTQ export timed alone against a cuBLAS fp16 product of the same shape (CUDA events, M = 1, 16, 512).
Every step checks --deadline and is skipped, not cut, once too little time is left; the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import common  # benchmarks/common.py (this folder is on sys.path when the script runs)

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("gptq", "awq", "compressed-tensors", "2:4", "2:4+W4")
# vLLM's kernel choice: "Using MarlinLinearKernel for GPTQMarlinLinearMethod" (gptq_marlin.py), "... for
# CompressedTensorsWNA16", "... for mixed-precision linear" (the kernel chooser). Where our plugin claims the
# checkpoint, that line names what vLLM would have run and PLUGIN_LINE says ours runs instead.
KERNEL_LINE = re.compile(r"Using (\w+) for ([\w.\- ]+?)\s*$", re.M)
PLUGIN_LINE = re.compile(r"compress-export plugin (claims|leaves vLLM) this checkpoint: (.*)")


def export_args(fmt: str, calibrated: bool) -> list:
    """CLI arguments for one format. Real weights get the calibrated pass; random weights the data-free one (the
    speed is the same and the export takes seconds). The group size is left to the CLI (128 where it divides every
    layer, else 64: SmolLM2's 576 columns)."""
    cal = ["--num-samples", "16", "--seq-len", "256"]
    if fmt == "gptq":
        return ["--format", "gptq", "--method", "gptq", *cal] if calibrated else ["--format", "gptq", "--method", "rtn"]
    if fmt == "awq":
        m = ["--method", "awq", "--awq-score", "linear", *cal] if calibrated else ["--method", "rtn", "--asym"]
        return ["--format", "awq", *m]
    if fmt == "compressed-tensors":
        return [
            "--format",
            "compressed-tensors",
            "--method",
            "gptq" if calibrated else "rtn",
            *(cal if calibrated else []),
        ]
    prune = ["--method", "sparsegpt", *cal] if calibrated else ["--method", "magnitude"]
    return ["--sparsity", "2:4", *prune, *(["--bits", "4"] if fmt == "2:4+W4" else [])]


# ---------------------------------------------------------------------------------------------- models


def build_models(work: Path, small: bool) -> dict:
    """{name: (dir, real_weights)}. --small: two-layer models of the same families, for the CPU dry run."""
    smol, real = smollm2(work, small)
    common.example_model = lambda: str(smol)  # random_llama takes SmolLM2's tokenizer from here
    kw = dict(hidden=256, layers=2, intermediate=512, heads=4, kv_heads=2) if small else {}
    t = time.time()
    big = common.random_llama(work / "llama-1b", **kw)
    print(f"built {big} in {time.time() - t:.0f} s", flush=True)
    return {"1b": (big, False), "smollm2": (smol, real)}  # the 1B first: its figures matter most if time runs out


def smollm2(work: Path, small: bool):
    """The real example model when its GGUF is in the cache (and not --small), else the same-shape stand-in."""
    from compress_export.pipeline.example_model import GGUF_NAME, default_cache_dir

    if not small and (default_cache_dir() / "wheels" / GGUF_NAME).exists():
        t = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "compress_export.cli.main", "example-model"], capture_output=True, text=True
        )
        if r.returncode == 0:
            print(f"built SmolLM2 from its GGUF in {time.time() - t:.0f} s", flush=True)
            return Path(r.stdout.strip().splitlines()[-1]), True
        print("example-model failed, using the stand-in:\n" + r.stderr[-1500:], flush=True)
    meta = Path(os.environ.get("GPU_CHECK_SMOLLM2_META", ""))
    if not (meta / "config.json").is_file():
        raise SystemExit(f"no SmolLM2 GGUF in the cache and no config/tokenizer folder at {meta}: run --prepare")
    return standin(meta, work / "smollm2-standin", small), False


def standin(meta: Path, out: Path, small: bool) -> Path:
    """SmolLM2's config and tokenizer with random bf16 weights (seed 0): the same shapes, so the same speed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(meta)
    if small:
        cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(meta).save_pretrained(out)
    return out


def export_all(models: dict, work: Path, device: str, deadline: float, log, small: bool) -> list:
    rows = []
    for name, (src, real) in models.items():
        # the dry run (--small) exports the SmolLM2 stand-in once: its builder is what differs from the 1B's
        for fmt in FORMATS if not small or name == "1b" else FORMATS[:1]:
            dst = work / f"{name}-{fmt.replace(':', '').replace('+', '-')}"
            rec = {"model": name, "format": fmt, "dir": str(dst)}
            if time.time() > deadline - 90:
                rows.append({**rec, "error": "skipped (time budget)"})
                continue
            args = [*export_args(fmt, real), "--device", device, "-q", str(src), "-o", str(dst)]
            t = time.time()
            code, err = cli_in_process(args)
            rec["seconds"] = round(time.time() - t, 1)
            log.write(f"\n=== export {name} {fmt}: compress-export {' '.join(args)}\n{err[-4000:]}\n")
            if code:
                rec["error"] = (err.strip().splitlines() or [f"exit {code}"])[-1][:200]
            else:
                rec["size_mb"] = common.size_mb(dst)
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    return rows


def cli_in_process(args: list):
    """`compress-export ARGS` in this process: (exit code, what it wrote to stderr). In process, because starting
    Python with torch and transformers ten times costs more than the ten exports of the small models."""
    import contextlib
    import io

    from compress_export.cli.main import main as cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(args)
    return code, err.getvalue()


# ---------------------------------------------------------------------------------------------- hf engine


def load(path: str, quantized: bool, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    if quantized:
        from compress_export import AutoCompressedModelForCausalLM

        return AutoCompressedModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(torch.device(device)).eval()


def quant_linears(model) -> list:
    from compress_export.kernels.linear import QuantLinear

    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def kernel_census(model) -> dict:
    return dict(Counter(type(m.kernel).name for m in quant_linears(model)))


def timed(fn, device: str) -> float:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def hf_speed(model, device: str, small: bool) -> dict:
    """Decode tok/s by batch and prefill tok/s; random prompt ids (seed 0), greedy, every sequence to the end."""
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    new, batches, pre = (4, (1,), (1, 32)) if small else (128, (1, 16), (4, 512))
    res = {"decode_tok_s": {}}
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(100, vocab, (b, 32), generator=g).to(device)

            def gen(n=new):
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=model.config.eos_token_id,
                )

            gen(4)  # warm-up: compiles the decode path of a torch.compile'd kernel
            res["decode_tok_s"][str(b)] = round(b * new / timed(gen, device), 1)
        ids = torch.randint(100, vocab, pre, generator=g).to(device)
        fwd = lambda: model(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        fwd()
        res["prefill_tok_s"] = round(ids.numel() / statistics.median(timed(fwd, device) for _ in range(3)), 1)
    return res


def kernel_microbench(model, dtype) -> list:
    """Each distinct (out, in) of the quantized linears alone, against cuBLAS on a dense weight of that shape."""
    import torch

    shapes, rows = {}, []
    for m in quant_linears(model):
        shapes.setdefault((m.out_features, m.in_features), m)
    for (n, k), m in shapes.items():
        dense = torch.randn(n, k, dtype=dtype, device="cuda")
        for M in (1, 16, 512):
            x = torch.randn(M, k, dtype=dtype, device="cuda")
            q, d = event_time(lambda: m(x)), event_time(lambda: x @ dense.t())
            rows.append(
                {
                    "shape": f"{n}x{k}",
                    "M": M,
                    "kernel": type(m.kernel).name,
                    "us": q,
                    "fp16_us": d,
                    "speedup": round(d / q, 2),
                }
            )
    return rows


def event_time(fn, iters: int = 50) -> float:
    """Mean µs per call over `iters` calls between two CUDA events, after 5 warm-up calls."""
    import torch

    for _ in range(5):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return round(a.elapsed_time(b) * 1000 / iters, 1)


def measure_hf(targets: list, device: str, small: bool, deadline: float, bench_path: Path) -> list:
    """targets: (model, format, dir) with format "original" for the unquantized model (fp16 on the GPU). One process, so torch.compile's caches
    are shared between exports of the same bit width."""
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    rows = []
    for name, fmt, d in targets:
        rec = {"engine": "hf", "model": name, "format": fmt}
        if time.time() > deadline - 40:
            rows.append({**rec, "error": "skipped (time budget)"})
            continue
        t = time.time()
        try:
            model = load(d, fmt != "original", device, dtype)
            rec["kernels"] = kernel_census(model)
            rec.update(hf_speed(model, device, small))
            if device.startswith("cuda") and name == "1b" and fmt == "gptq":
                bench = kernel_microbench(model, dtype)
                bench_path.write_text("\n".join(map(json.dumps, bench)) + "\n")
        except Exception as e:  # one broken row must not cost the others; the table shows its error
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        model = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rec["seconds"] = round(time.time() - t, 1)
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    return rows


# ---------------------------------------------------------------------------------------------- vllm engine


def vllm_one(a) -> None:
    """One engine in this process: decode at batch 1 and 16, prefill 16 × 512; prints `RESULT {json}`."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=1024, gpu_memory_utilization=0.4, seed=0)
    rng = random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    prompts = lambda n, L: [
        TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(L)]) for _ in range(n)
    ]  # noqa: E731
    new = 8 if a.small else 128
    res = {"decode_tok_s": {}}
    for b in (1,) if a.small else (1, 16):
        sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        llm.generate(prompts(b, 32), sp, use_tqdm=False)  # warm-up
        p = prompts(b, 32)
        t = time.perf_counter()
        llm.generate(p, sp, use_tqdm=False)
        res["decode_tok_s"][str(b)] = round(b * new / (time.perf_counter() - t), 1)
    n, L = (2, 32) if a.small else (16, 512)
    p = prompts(n, L)
    t = time.perf_counter()
    llm.generate(p, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    res["prefill_tok_s"] = round(n * L / (time.perf_counter() - t), 1)
    print("RESULT " + json.dumps(res), flush=True)


def measure_vllm(targets: list, dtype: str, small: bool, deadline: float, log) -> list:
    rows = []
    for name, fmt, d in targets:
        rec = {"engine": "vllm", "model": name, "format": fmt}
        left = deadline - time.time()
        if left < 60:
            rows.append({**rec, "error": "skipped (time budget)"})
            continue
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "vllm-one",
            d,
            "--dtype",
            dtype,
            *(["--small"] if small else []),
        ]
        t = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=min(240, left - 10))
            text, code = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            text, code = f"{e.stdout or ''}{e.stderr or ''}", "timeout"
            text = text if isinstance(text, str) else text.decode(errors="replace")
        rec["seconds"] = round(time.time() - t, 1)
        log.write(f"\n=== vllm {name} {fmt}: {' '.join(cmd)}\n{text[-20000:]}\n")
        rec["kernels"] = sorted({f"{k} ({m})" for k, m in KERNEL_LINE.findall(text) if "Kernel" in k or "Marlin" in k})
        rec["plugin"] = [f"{c}: {why}" for c, why in PLUGIN_LINE.findall(text)][:1]
        res = [json.loads(ln[7:]) for ln in text.splitlines() if ln.startswith("RESULT ")]
        if res:
            rec.update(res[0])
        else:
            rec["error"] = f"exit {code}: " + (text.strip().splitlines() or [""])[-1][:200]
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    return rows


# ---------------------------------------------------------------------------------------------- table


def table(exports: list, runs: list) -> str:
    """Markdown: one line per (engine, model, format) with the ratio to the same engine's fp16 original."""
    base = {(r["engine"], r["model"]): r for r in runs if r["format"] == "original" and "error" not in r}
    size = {(e["model"], e["format"]): e for e in exports}
    head = [
        "engine",
        "model",
        "format",
        "MB",
        "kernel(s)",
        "decode b1",
        "decode b16",
        "prefill",
        "vs original (b1/b16/prefill)",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        e = size.get((r["model"], r["format"]), {})
        if "error" in r:
            out.append(f"| {r['engine']} | {r['model']} | {r['format']} | {e.get('size_mb', '–')} | {r['error']} |||||")
            continue
        dec, b = r.get("decode_tok_s", {}), base.get((r["engine"], r["model"]))
        kern = r.get("kernels")
        kern = ", ".join(f"{k} ×{n}" for k, n in kern.items()) if isinstance(kern, dict) else ", ".join(kern or [])
        kern = kern or "dense"
        if r.get("plugin"):  # vLLM rows: where our plugin claims, vLLM's logged pick is what it would have run
            claim = r["plugin"][0]
            kern = f"ours (plugin {claim[:70]}); vLLM's pick: {kern}" if claim.startswith("claims") else kern
        ratio = "–"
        if b and r["format"] != "original":
            pairs = [
                (dec.get("1"), b["decode_tok_s"].get("1")),
                (dec.get("16"), b["decode_tok_s"].get("16")),
                (r.get("prefill_tok_s"), b.get("prefill_tok_s")),
            ]
            ratio = " / ".join(f"{x / y:.2f}×" if x and y else "–" for x, y in pairs)
        out.append(
            f"| {r['engine']} | {r['model']} | {r['format']} | {e.get('size_mb', '–')} | {kern} | "
            f"{dec.get('1', '–')} | {dec.get('16', '–')} | {r.get('prefill_tok_s', '–')} | {ratio} |"
        )
    bad = [e for e in exports if "error" in e]
    out += [f"\nexport failed: {e['model']} {e['format']}: {e['error']}" for e in bad]
    return "\n".join(out)


def run(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline = a.deadline or time.time() + 3600
    models = build_models(work, a.small)
    with open(out / "exports.log", "a") as log:
        exports = export_all(models, work, a.device, deadline, log, a.small)
    targets = []
    for name, (src, real) in models.items():
        if a.small and name != "1b":  # the dry run: smollm2's exports are checked; its timings add only minutes
            continue
        exports.append({"model": name, "format": "original", "size_mb": common.size_mb(src)})
        targets.append((name, "original", str(src)))
        targets += [
            (name, e["format"], e["dir"]) for e in exports if e["model"] == name and "dir" in e and "error" not in e
        ]
    runs = measure_hf(targets, a.device, a.small, deadline, out / "kernel_microbench.jsonl")
    if a.vllm:
        with open(out / "vllm.log", "a") as log:
            runs += measure_vllm(
                targets, "float16" if a.device.startswith("cuda") else "float32", a.small, deadline, log
            )
    (out / "results.json").write_text(
        json.dumps({"exports": exports, "runs": runs, "smollm2_real_weights": models["smollm2"][1]}, indent=1)
    )
    note = "real weights (from the GGUF)" if models["smollm2"][1] else "stand-in: SmolLM2's shape, random weights"
    act = "fp16 activations on the GPU" if a.device.startswith("cuda") else "fp32 activations on the CPU"
    text = f"smollm2: {note}; 1b: random weights. Tokens/s, {act}.\n\n" + table(exports, runs)
    mb = out / "kernel_microbench.jsonl"
    if mb.exists():
        text += "\n\n1B GPTQ linears alone vs cuBLAS fp16 (µs per call):\n\n| shape | M | kernel | µs | fp16 µs | fp16/ours |\n|---|---|---|---|---|---|\n"
        for r in map(json.loads, mb.read_text().splitlines()):
            text += f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['us']} | {r['fp16_us']} | {r['speedup']}× |\n"
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/gpu-check-work", help="models and exports (several GB on the 1B)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--deadline", type=float, default=0.0, help="epoch seconds; later steps are skipped after it")
    r.add_argument("--small", action="store_true", help="two-layer models and short runs (the CPU dry run)")
    r.add_argument("--vllm", action="store_true", help="also serve every row with vLLM (offline LLM)")
    v = sub.add_parser("vllm-one")
    v.add_argument("model")
    v.add_argument("--dtype", default="float16")
    v.add_argument("--small", action="store_true")
    a = p.parse_args()
    run(a) if a.verb == "run" else vllm_one(a)


if __name__ == "__main__":
    main()
