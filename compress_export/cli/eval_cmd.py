"""`compress-export eval OUT [--text FILE] [--tasks T1,T2]`: perplexity on the shared protocol (our loader or
vLLM), and lm-evaluation-harness tasks on the same export (integrations/lm_harness.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress_export.core.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compress-export eval",
        description="Token/word/byte perplexity and bits per byte (shared protocol); lm-eval tasks with --tasks.",
    )
    p.add_argument("dir", help="an export or an unquantized model directory")
    p.add_argument("--text", help="UTF-8 text to score, e.g. ../shared/data/text/eval.txt")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument(
        "--engine",
        choices=("torch", "vllm"),
        default="torch",
        help="torch: our loader in fp32 (default); vllm: vLLM's prompt log-probabilities, i.e. what "
        "vLLM serves (its kernels, dtype and any activation quantization)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="--engine vllm: the engine dtype (default: this machine's fastest)",
    )
    p.add_argument(
        "--no-lowrank",
        dest="lowrank",
        action="store_false",
        help="leave out the export's low-rank correction (OUT/lowrank; applied by default)",
    )
    p.add_argument(
        "--card",
        action="store_true",
        help="also record the token perplexity in the export's model card (README.md, 'Measured')",
    )
    g = p.add_argument_group("lm-evaluation-harness (pip install lm-eval)")
    g.add_argument("--tasks", help="comma-separated lm-eval tasks, run on the same engine (e.g. hellaswag,arc_easy)")
    g.add_argument("--limit", type=float, help="lm-eval: at most this many documents per task (or a fraction < 1)")
    g.add_argument("--include-path", help="lm-eval: a folder of local task YAMLs")
    p.add_argument("--json", action="store_true")
    return p


def cmd_eval(argv):
    a = _parser().parse_args(argv)
    if not a.text and not a.tasks:
        raise UserError("eval needs --text FILE (perplexity) or --tasks T1,T2 (lm-eval), or both")
    if a.card and not a.text:
        raise UserError("--card records the perplexity of --text FILE; give --text too")
    if a.window < 2:  # a window scores each token after its first
        raise UserError(f"--window must be at least 2 tokens (got {a.window})")
    if a.windows < 1:
        raise UserError(f"--windows must be at least 1 (got {a.windows})")
    if a.tasks:
        from compress_export.integrations.lm_harness import require_lm_eval

        require_lm_eval()  # before the minutes of perplexity
    out = {}
    if a.text:
        out["perplexity"] = _perplexity(a)
    if a.tasks:
        from compress_export.integrations.lm_harness import evaluate

        tasks = [t for t in a.tasks.split(",") if t]
        res = evaluate(
            a.dir, tasks, engine=a.engine, limit=a.limit, include_path=a.include_path, dtype=a.dtype, lowrank=a.lowrank
        )
        out["lm_eval"] = res["results"]
        if not a.json:
            print(res["table"])
    if a.json:
        print(json.dumps(out if a.tasks else out["perplexity"], indent=2, default=str))
    return 0


def _perplexity(a) -> dict:
    from compress_export.io.export_check import check_perplexity, read_eval_text

    text = read_eval_text(a.text)
    if a.card:  # before the minutes of measuring: a card goes only into our own exports
        from compress_export.io.model_card import check_card_target

        check_card_target(a.dir)
    r, where = _vllm_perplexity(a, text) if a.engine == "vllm" else _torch_perplexity(a, text)
    check_perplexity(a.dir, r, a.text, a.engine)  # never `ppl nan` with exit 0
    if a.card:
        from compress_export.io.model_card import record_figure

        how = f"compress-export eval --engine {a.engine}: {r['windows']}×{a.window} tokens; {where}"
        value = f"{r['token_perplexity']:.3f}"
        record_figure(Path(a.dir), {"what": "token perplexity", "text": Path(a.text).name, "value": value, "how": how})
    if not a.json:
        print(
            f"{a.dir}: token ppl {r['token_perplexity']:.3f}  word ppl {r['word_perplexity']:.2f}  "
            f"byte ppl {r['byte_perplexity']:.4f}  bits/byte {r['bits_per_byte']:.4f}  "
            f"({r['windows']}×{a.window} tokens, {r['seconds']:.1f} s; {where})"
        )
    return {**r, "engine": where}


def _vllm_perplexity(a, text: str):
    from compress_export.integrations.validate import vllm_perplexity
    from compress_export.integrations.vllm_lowrank import fused_requested, served_lora
    from compress_export.io.export_check import check_eval_windows, check_export
    from compress_export.io.lowrank import ADAPTER_DIR, adapter_rank
    from compress_export.io.model_io import load_tokenizer

    model_dir = check_export(a.dir, quantized=False).path  # what our loader refuses, before vLLM starts
    check_eval_windows(a.text, text, load_tokenizer(model_dir), a.window)
    lora = served_lora(a.dir, wanted=a.lowrank)  # None when fused: our plugin's linears apply it then
    res = vllm_perplexity(model_dir, a.text, a.window, a.windows, a.dtype, lora=lora)
    r, where = res["perplexity"], f"vLLM {res.get('quantization') or 'unquantized'}, {res.get('dtype')}"
    r["kernels"] = res.get("kernels")
    fused = a.lowrank and fused_requested() and adapter_rank(Path(a.dir) / ADAPTER_DIR) is not None
    where += ", with its low-rank adapter" if lora else ", its low-rank correction fused" if fused else ""
    return r, where


def _torch_perplexity(a, text: str):
    from compress_export.io.export_check import check_eval_windows
    from compress_export.io.loading import load_model
    from compress_export.io.lowrank import ADAPTER_DIR
    from compress_export.pipeline.evaluate import perplexity

    model, tok = load_model(a.dir, lowrank=a.lowrank)  # checks the export, refuses NaN or Inf in its tensors
    check_eval_windows(a.text, text, tok, a.window)
    where = "our loader, float32"
    try:
        r = perplexity(model, tok, text, a.window, a.windows).as_dict()
    except OverflowError:  # a mean loss past exp's range (709 nats): the model's numbers blow up
        r = {"token_perplexity": float("inf")}
    where += ", with its low-rank adapter" if a.lowrank and (Path(a.dir) / ADAPTER_DIR).is_dir() else ""
    return r, where
