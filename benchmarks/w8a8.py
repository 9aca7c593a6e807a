"""W8A8 int8 (compressed-tensors int-quantized) served by vLLM, with and without SmoothQuant: perplexity from
vLLM's prompt log-probabilities, prefill and decode speed, against the unquantized model.

  python benchmarks/w8a8.py [--models smollm2,1b] [--variants rtn,rtn-sq,gptq,gptq-sq] [--alpha 0.5]
                            [--dtype float32] [--plugin] [--no-ours] [--decode-batches 1,4]
                            [--out benchmarks/results/w8a8.json]

- smollm2: SmolLM2-135M-Instruct; GPTQ and SmoothQuant calibrate on 64 × 512 tokens of calib.txt.
- 1b: a random-weight Llama of 1.07 B parameters (benchmarks/common.random_llama); its perplexity is noise, its
  speed is that of a 1B model. Calibration there: 16 × 256 tokens.
Every model runs in its own vLLM process with our plugin not loaded (VLLM_PLUGINS=""), so vLLM's own kernels run
everything; with --plugin each export is served a second time with our plugin loaded, whose route decides (on x86
CPUs without VNNI our exact int8 GEMM claims W8A8: vLLM's oneDNN GEMM saturates there, benchmarks/int8_exactness.py).
The engine dtype is the machine's fastest (hardware.fast_dtype) unless --dtype says otherwise.
Per model: token perplexity on eval.txt (16 × 512-token windows, the shared protocol) from vLLM, and from our
loader (its int8 kernel: the same per-token int8 × per-channel int8 arithmetic, exactly in integers); prefill
tokens/s = 512 / time to first token of a 512-token prompt; decode tokens/s at batch 1 (32 new tokens after that
prompt); offline throughput of 16 prompts of 128 tokens generating 64 each. Medians of 3 where repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import TEXT, cli, example_model, random_llama, size_mb, vllm_check

from compress_export.core.hardware import cpu_kind, fast_dtype
from compress_export.integrations.validate import PROMPTS, ValidateOptions, _offline_spec, _run_offline, _Steps

VARIANTS = {
    "rtn": ["--method", "rtn", "--smoothquant", "0"],
    "rtn-sq": ["--method", "rtn", "--smoothquant", "{alpha}"],
    "gptq": ["--method", "gptq", "--smoothquant", "0"],
    "gptq-sq": ["--method", "gptq", "--smoothquant", "{alpha}"],
}
OPTIONS = ValidateOptions(
    max_new_tokens=8,
    windows=16,
    latency_lengths=((512, 32),),
    latency_repeats=3,
    num_prompts=16,
    input_len=128,
    output_len=64,
    serve=False,
    prompts=(PROMPTS[0],),
)


@dataclass(frozen=True)
class Run:
    """How every row is made: vLLM's engine dtype, the scratch folder, our loader's ppl or not, the plugin rows,
    and the batch sizes of the decode-alone timing ("" none)."""

    dtype: str
    tmp: Path
    ours: bool = True
    plugin: bool = False
    decode_batches: str = ""


def serve_figures(model: Path, run: Run, tag: str, plugin: bool = False) -> dict:
    # the child process inherits it: "" loads no plugin, so vLLM's own kernels run everything
    if plugin:
        os.environ.pop("VLLM_PLUGINS", None)
    else:
        os.environ["VLLM_PLUGINS"] = ""
    spec = _offline_spec(model, OPTIONS, TEXT / "eval.txt")
    spec["engine"] = {"dtype": run.dtype}
    res = _run_offline(model, spec, run.tmp, tag, _Steps(5, tag, enabled=False), timeout=3600)
    if "error" in res:
        return {"error": res["error"][:300]}
    lat = res["latency"][0]
    if run.decode_batches:  # the latency run's decode subtracts a long prefill; this one times decode alone
        r = vllm_check(model, "--max-tokens", 64, "--repeats", 3, "--batches", run.decode_batches, "--dtype", run.dtype)
        res["decode_by_batch"] = r.get("decode_tok_s_by_batch") or r.get("error", "")[-200:]
    return {
        "decode_by_batch": res.get("decode_by_batch"),
        "vllm_ppl": round(res["perplexity"]["token_perplexity"], 3),
        "quantization": res.get("quantization"),
        "kernels": res.get("kernels"),
        "prefill_tok_s": round(lat["input_len"] / (lat["ttft_ms"] / 1e3), 1),
        "decode_tok_s": lat["decode_tok_s"],
        "throughput_out_tok_s": res["throughput"]["output_tok_s"],
    }


def rows_for(name: str, base: Path, calib: list, variants: list, alpha: float, run: Run) -> list:
    rows = []
    for v in ["original"] + variants:
        t = time.time()
        if v == "original":
            target, rec = base, {"model": name, "variant": "original", "compress_s": 0.0}
        else:
            target = run.tmp / f"{name}-{v}"
            args = [a.format(alpha=alpha) for a in VARIANTS[v]]
            needs_data = v != "rtn"
            s = cli("--scheme", "W8A8", *args, *(calib if needs_data else []), base, "-o", target, "-q")
            rec = {"model": name, "variant": v, "compress_s": round(s["seconds"], 1)}
        rec["size_mb"] = size_mb(target)
        if run.ours:
            rec["ours_ppl"] = round(cli("eval", target, "--text", TEXT / "eval.txt")["token_perplexity"], 3)
        rec.update(serve_figures(target, run, f"{name}-{v}"))
        rows.append(rec)
        print(json.dumps(rec), f"({time.time() - t:.0f} s wall)", flush=True)
        if run.plugin and v != "original":  # the same export with our plugin loaded: its route decides who runs it
            t = time.time()
            rec = {
                **{k: rec[k] for k in ("model", "size_mb", "compress_s", "ours_ppl") if k in rec},
                "variant": f"{v} (plugin)",
                **serve_figures(target, run, f"{name}-{v}-plugin", True),
            }
            rows.append(rec)
            print(json.dumps(rec), f"({time.time() - t:.0f} s wall)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,1b")
    p.add_argument("--variants", default="rtn,rtn-sq,gptq,gptq-sq")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--dtype", default=fast_dtype("cpu"))
    p.add_argument("--no-ours", action="store_true", help="skip our loader's perplexity (speed runs)")
    p.add_argument(
        "--plugin",
        action="store_true",
        help="also serve each export with our plugin loaded (on x86 CPUs without VNNI our exact int8 "
        "GEMM claims W8A8; elsewhere vLLM keeps it)",
    )
    p.add_argument(
        "--decode-batches",
        default="",
        help="also time decode alone (64 tokens after a short prompt, median of 3) at these batch sizes, "
        "e.g. 1,4: on a 1B model the latency run's decode figure subtracts a 15 s prefill",
    )
    p.add_argument("--out", help="also write the rows as JSON here")
    a = p.parse_args()
    variants = a.variants.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(a.dtype, Path(tmp), not a.no_ours, a.plugin, a.decode_batches)
        if "smollm2" in a.models:
            calib = ["--dataset", TEXT / "calib.txt", "--num-samples", "64", "--seq-len", "512"]
            rows += rows_for("SmolLM2-135M", Path(example_model()), calib, variants, a.alpha, run)
        if "1b" in a.models:
            calib = ["--dataset", TEXT / "calib.txt", "--num-samples", "16", "--seq-len", "256"]
            rows += rows_for("Llama-1B (random)", random_llama(run.tmp / "llama-1b"), calib, variants, a.alpha, run)
    plug = "rows marked (plugin) with our plugin loaded, the others without" if a.plugin else "plugin not loaded"
    print(f"\n{cpu_kind()} CPU, vLLM engine dtype {a.dtype}, {plug}; SmoothQuant α = {a.alpha}\n")
    cols = [
        "model",
        "variant",
        "vllm_ppl",
        "ours_ppl",
        "prefill_tok_s",
        "decode_tok_s",
        "throughput_out_tok_s",
        "decode_by_batch",
        "size_mb",
        "compress_s",
        "kernels",
    ]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, r.get("error", "–"))) for c in cols) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
