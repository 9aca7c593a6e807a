"""`compress-export validate OUT [--baseline MODEL_DIR]`: the export (and a baseline) in vLLM, each in its own
subprocess; the options map onto integrations.validate.ValidateOptions."""

from __future__ import annotations

import argparse
import json

from compress_export.core.errors import UserError


def _parser(d) -> tuple:
    """The argument parser, and the number flags that map to ValidateOptions fields."""
    p = argparse.ArgumentParser(
        prog="compress-export validate",
        description="Run an export (and a baseline) in vLLM, each in its own subprocess: greedy outputs and token "
        "agreement, perplexity from vLLM's prompt logprobs, batch-1 latency, offline and served "
        "throughput (vllm bench serve on 127.0.0.1), a load sweep (prefill-heavy and decode-heavy requests at "
        "several concurrencies: throughput, TTFT/TPOT percentiles), memory. Writes report.json, report.md and plots.",
    )
    p.add_argument("dir", metavar="OUT", help="the export to validate")
    p.add_argument("--baseline", metavar="MODEL_DIR", help="the uncompressed model, for ratios and agreement")
    p.add_argument("--report-dir", help="where the report goes (default: OUT-validation beside OUT)")
    p.add_argument(
        "--text",
        help="UTF-8 text for perplexity (default: a passage shipped with compress-export; "
        "the project's protocol uses ../shared/data/text/eval.txt)",
    )
    # Each number flag maps to a ValidateOptions field; unset ones keep the default (or --quick's) value.
    fields = {
        "window": "window",
        "windows": "windows",
        "repeats": "latency_repeats",
        "num_prompts": "num_prompts",
        "input_len": "input_len",
        "output_len": "output_len",
        "concurrency": "concurrency",
        "max_new_tokens": "max_new_tokens",
        "load_prompts": "load_prompts",
    }
    helps = {
        "window": "tokens per perplexity window",
        "windows": "perplexity windows (at most)",
        "repeats": "latency repeats (median)",
        "num_prompts": "throughput prompts (offline and served)",
        "input_len": "throughput prompt tokens",
        "output_len": "throughput output tokens",
        "concurrency": "requests in flight for the one classic served point (the load sweep: --load-concurrency)",
        "max_new_tokens": "greedy tokens per prompt",
        "load_prompts": "requests per load point: at least this, and 2 × its concurrency",
    }
    for flag, field_name in fields.items():
        p.add_argument(
            "--" + flag.replace("_", "-"), type=int, help=f"{helps[flag]} (default {getattr(d, field_name)})"
        )
    p.add_argument(
        "--lengths",
        help="batch-1 latency points, PROMPTxOUTPUT tokens (default "
        + ",".join(f"{a}x{b}" for a, b in d.latency_lengths)
        + ")",
    )
    p.add_argument(
        "--prompts",
        help="greedy prompts: .jsonl ({\"text\", \"chat\"} per line) or one per line, "
        "'chat: ' in front for chat (default: 8 built-in prompts, 3 of them chat)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="engine dtype for both models (default auto: each in this machine's fastest, bf16 on CPUs "
        "with AVX-512 bf16 or AMX, float32 on AVX2-only CPUs)",
    )
    mixes = {name: (a, b) for name, a, b in d.load_mixes}
    p.add_argument(
        "--load-concurrency",
        help="load sweep: requests in flight at each point (default "
        + ",".join(map(str, d.load_concurrency))
        + "; --quick 1,2)",
    )
    for name, (a, b) in mixes.items():
        p.add_argument(
            f"--{name.split('-')[0]}-mix",
            metavar="PROMPTxOUTPUT",
            help=f"load sweep: the {name} mix's tokens per request (default {a}x{b})",
        )
    p.add_argument("--no-load", action="store_true", help="skip the load sweep (keeps the one served point)")
    p.add_argument("--no-serve", action="store_true", help="skip vllm serve (offline figures only)")
    p.add_argument("--quick", action="store_true", help="small N everywhere (a smoke run in a few minutes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument(
        "--card",
        action="store_true",
        help="also record vLLM's perplexity, batch-1 decode speed and the verdict in the export's model card",
    )
    p.add_argument("--json", action="store_true", help="print report.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return p, fields


def cmd_validate(argv) -> int:
    from compress_export.integrations.load_sweep import parse_concurrency
    from compress_export.integrations.validate import ValidateOptions, load_prompts, parse_lengths

    d = ValidateOptions()
    p, fields = _parser(d)
    a = p.parse_args(argv)
    from dataclasses import replace

    from compress_export.integrations.validate import validate

    given = {}
    for flag, field_name in fields.items():
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
        if v is not None:
            given[field_name] = v
    if a.lengths:
        given["latency_lengths"] = parse_lengths(a.lengths)
    if a.prompts:
        given["prompts"] = load_prompts(a.prompts)
    if a.load_concurrency:
        given["load_concurrency"] = parse_concurrency(a.load_concurrency)
    base = ValidateOptions.quick() if a.quick else d
    given["load_mixes"] = tuple(_mix(a, name, inp, out) for name, inp, out in base.load_mixes)
    opts = replace(
        base,
        serve=not a.no_serve,
        load=not a.no_load,
        dtype="" if a.dtype == "auto" else a.dtype,
        **given,
    )
    if a.card:  # before the minutes of measuring: a card goes only into our own exports
        from compress_export.io.model_card import check_card_target

        check_card_target(a.dir)
    r = validate(a.dir, a.baseline, a.report_dir, a.text, opts, overwrite=a.overwrite, progress=not a.quiet)
    if a.card and "error" not in r["runs"]["export"]["offline"]:
        _record(a.dir, r)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print("\n".join(r["verdict"]))
        print(f"report: {r['report_dir']}/report.md")
    return 0 if "error" not in r["runs"]["export"]["offline"] else 1


def _record(export: str, r: dict) -> None:
    """validate's headline figures as rows of the export's model card (each replaces its own earlier row)."""
    import statistics
    from pathlib import Path

    from compress_export.io.model_card import record_figure

    off = r["runs"]["export"]["offline"]
    how = f"compress-export validate ({off.get('dtype', '?')}; report {Path(r['report_dir']).name})"
    text = Path(r["text"]).name
    ppl = (off.get("perplexity") or {}).get("token_perplexity")
    if ppl is not None:
        record_figure(Path(export), {"what": "vLLM token perplexity", "text": text, "value": f"{ppl:.3f}", "how": how})
    lat = [x.get("decode_tok_s") or 0 for x in off.get("latency") or []]
    if lat:
        value = f"{statistics.median(lat):.2f}"
        record_figure(Path(export), {"what": "vLLM decode tokens/s, batch 1", "text": "-", "value": value, "how": how})
    verdict = [v for v in r.get("verdict", []) if v.startswith("Worth serving")]
    if verdict:
        record_figure(Path(export), {"what": "validate verdict", "text": text, "value": verdict[-1], "how": how})


def _mix(a, name: str, inp: int, out: int) -> tuple:
    """A load mix with its --prefill-mix / --decode-mix override, if given."""
    from compress_export.integrations.validate import parse_lengths

    flag = name.split("-")[0] + "_mix"
    spec = getattr(a, flag, None)
    if not spec:
        return (name, inp, out)
    try:
        ((inp, out),) = parse_lengths(spec)
    except (UserError, ValueError):
        raise UserError(f"--{flag.replace('_', '-')} {spec!r}: give one PROMPTxOUTPUT pair, e.g. 512x16") from None
    return (name, inp, out)
