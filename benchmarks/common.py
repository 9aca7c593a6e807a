"""Helpers the benchmark scripts share (run them as `python benchmarks/NAME.py`, which puts this folder on the path)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text"


def example_model() -> str:
    """Path of the built-in SmolLM2 example model, built on first use."""
    return subprocess.run(
        [sys.executable, "-m", "compress_export.cli.main", "example-model"], capture_output=True, text=True, check=True
    ).stdout.strip()


def cli(*args) -> dict:
    """Run `compress-export ARGS --json` in a fresh process (so peak RSS is its own); the parsed summary."""
    r = subprocess.run(
        [sys.executable, "-m", "compress_export.cli.main", *map(str, args), "--json"], capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout[r.stdout.index("{") :])


def size_mb(d) -> float:
    from compress_export.io.writer import dir_weight_bytes

    return round(dir_weight_bytes(d) / 1e6, 1)


def measure_rows(model: str, specs: list, out_json=None, after=None, cols=None) -> list:
    """Each (name, spec): spec None = the model itself; ("convert", SRC_ROW, FORMAT) = repack an earlier row;
    else CLI arguments for an export. Every row is evaluated on the shared protocol; prints JSON lines and a table.
    after(target_dir, record) runs while the row's export still exists and may add to the record."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row, spec in specs:
            t = time.time()
            target = Path(tmp) / row.replace(">", "-to-").replace(":", "of")
            if spec is None:
                target = Path(model)
                rec = {"row": row, "seconds": 0.0, "peak_rss_mb": None}
            elif spec[0] == "convert":
                src = Path(tmp) / spec[1].replace(":", "of")
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "compress_export.cli.main",
                        "convert",
                        src,
                        "--format",
                        spec[2],
                        "-o",
                        target,
                    ],
                    check=True,
                    capture_output=True,
                )
                rec = {"row": row, "seconds": round(time.time() - t, 1), "peak_rss_mb": None}
            else:
                s = cli(*spec, model, "-o", target, "-q")
                rec = {"row": row, "seconds": round(s["seconds"], 1), "peak_rss_mb": round(s["peak_rss_mb"])}
            rec["size_mb"] = size_mb(target)
            ev = cli("eval", target, "--text", TEXT / "eval.txt")
            rec.update(
                token_ppl=round(ev["token_perplexity"], 2),
                word_ppl=round(ev["word_perplexity"], 1),
                byte_ppl=round(ev["byte_perplexity"], 4),
                bits_per_byte=round(ev["bits_per_byte"], 4),
            )
            if after is not None:
                after(target, rec)
            results.append(rec)
            print(json.dumps(rec), f"({time.time() - t:.0f} s wall)", flush=True)
    cols = cols or ["row", "token_ppl", "word_ppl", "byte_ppl", "bits_per_byte", "seconds", "peak_rss_mb", "size_mb"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |")
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2))
    return results


def random_llama(path, hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, seed=0) -> Path:
    """A random-weight Llama with SmolLM2's tokenizer (bf16 on disk, tied embeddings): the shape of a larger model
    for speed and memory figures, built in seconds. Its outputs are noise; only its shapes matter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(example_model())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def vllm_check(model, *args) -> dict:
    """`compress_export.integrations.vllm_check MODEL ARGS` in a fresh process: its RESULT, or {"error": ...}."""
    from compress_export.integrations.vllm_check import read_result

    r = subprocess.run(
        [sys.executable, "-m", "compress_export.integrations.vllm_check", str(model), *map(str, args)],
        capture_output=True,
        text=True,
    )
    res = read_result(r.stdout)
    if r.returncode or res is None:
        return {"model": str(model), "error": (r.stderr or r.stdout)[-1500:]}
    return res


def timed(fn, repeats: int, *, warmup: int = 10, stat=statistics.median) -> float:
    """Milliseconds per call of fn: `warmup` untimed calls first (steady state: caches warm, OpenMP's threads awake,
    as between a model's linears), then `stat` (median; min for the least disturbed) of `repeats` timed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return stat(ts) * 1e3


def bench_venv(name: str, *packages: str) -> Path:
    """The python of .bench/NAME (a peer tool's own venv, created on first use with the CPU torch this project
    pins, then `packages`): never a dependency of ours."""
    venv = ROOT / ".bench" / name
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", *packages], check=True)
    return py
