"""The validation report: comparisons (pure functions of the measured runs), a verdict, report.md and PNG plots.

Ratios are export / baseline throughout, except speed-ups (baseline time / export time, > 1 = export faster).
Plots need matplotlib (`pip install compress-export[report]`); without it the report says so and has no plots.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from compress_export.integrations import load_sweep

# Perplexity increase (export over baseline, %) up to which the verdict calls the quality close / acceptable.
CLOSE_PCT, ACCEPTABLE_PCT = 5.0, 15.0


def get(d, *keys):
    """d[k1][k2]... or None where any level is missing (a failed run has no figures)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(a, b, digits: int = 3):
    return round(a / b, digits) if a is not None and b not in (None, 0) else None


def token_agreement(a: list, b: list) -> dict:
    """Position-by-position agreement of two greedy continuations (a shorter one counts its missing positions
    as disagreements) and the first position where they differ (None: identical)."""
    n = max(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return {"positions": n, "matches": same, "first_divergence": first}


def compare_greedy(export: list, baseline: list) -> dict:
    base = {(g["prompt"], g["chat"]): g for g in baseline}
    rows, matches, positions = [], 0, 0
    for g in export:
        b = base.get((g["prompt"], g["chat"]))
        if b is None:
            continue
        t = token_agreement(g["token_ids"], b["token_ids"])
        matches, positions = matches + t["matches"], positions + t["positions"]
        rows.append({"prompt": g["prompt"], "chat": g["chat"], **t})
    return {
        "token_agreement": round(matches / positions, 4) if positions else None,
        "identical": sum(r["first_divergence"] is None for r in rows),
        "prompts": len(rows),
        "rows": rows,
    }


def compare(runs: dict) -> dict:
    """Export against baseline on every figure both runs have; {} without a baseline."""
    e, b = runs.get("export"), runs.get("baseline")
    if not e or not b:
        return {}
    out = {
        "size_ratio": ratio(e["size_mb"], b["size_mb"]),
        "weight_bytes_ratio": ratio(get(e, "offline", "weight_bytes"), get(b, "offline", "weight_bytes")),
        "peak_rss_ratio_offline": ratio(get(e, "offline", "peak_rss_mb"), get(b, "offline", "peak_rss_mb")),
    }
    if get(e, "offline", "greedy") and get(b, "offline", "greedy"):
        out["greedy"] = compare_greedy(e["offline"]["greedy"], b["offline"]["greedy"])
    for k in ("token_perplexity", "word_perplexity", "byte_perplexity"):
        out[f"{k}_ratio"] = ratio(get(e, "offline", "perplexity", k), get(b, "offline", "perplexity", k), 4)
    lat = []
    for le, lb in zip(get(e, "offline", "latency") or [], get(b, "offline", "latency") or []):
        lat.append(
            {
                "input_len": le["input_len"],
                "output_len": le["output_len"],
                "ttft_speedup": ratio(lb["ttft_ms"], le["ttft_ms"]),
                "tpot_speedup": ratio(lb["tpot_ms"], le["tpot_ms"]),
            }
        )
    out["latency"] = lat
    out["offline_throughput_ratio"] = ratio(
        get(e, "offline", "throughput", "output_tok_s"), get(b, "offline", "throughput", "output_tok_s")
    )
    out["served_throughput_ratio"] = ratio(
        get(e, "serve", "bench", "output_throughput"), get(b, "serve", "bench", "output_throughput")
    )
    out["served_p50_e2el_speedup"] = ratio(
        get(b, "serve", "bench", "p50_e2el_ms"), get(e, "serve", "bench", "p50_e2el_ms")
    )
    if get(e, "serve", "load") and get(b, "serve", "load"):
        out["load"] = load_sweep.compare(e["serve"]["load"], b["serve"]["load"])
    return out


def kernel_summary(offline: dict) -> str:
    """ "compress_export:cpu-wna16 (120 linears)" from a run's kernel counts; "dense weights" when none."""
    k = (offline or {}).get("kernels")
    if k is None:
        return "kernels not recorded"
    if not k:
        return "dense weights"
    return ", ".join(f"{name} ({n} linears)" for name, n in sorted(k.items()))


def how_it_ran(report: dict) -> str:
    """Each model's dtype and kernel: the figures compare each model in the dtype this machine runs it fastest."""
    parts = []
    for t in _tags(report)[::-1]:
        off = report["runs"][t].get("offline") or {}
        parts.append(f"{t} in {off.get('dtype', '?')} with {kernel_summary(off)}")
    return "Ran: " + "; ".join(parts) + "."


def _first_line(err: str) -> str:
    return (err or "").strip().splitlines()[0][:200] if err else ""


def verdict(report: dict) -> list:
    """A few sentences a user can act on, each with the number behind it."""
    e = report["runs"]["export"]
    c = report.get("comparison") or {}
    lines = []
    if "error" in e["offline"]:
        return [
            f"NOT SERVABLE: the export failed in vLLM offline ({_first_line(e['offline']['error'])}); "
            "see logs/export-offline.log."
        ]
    serve = e.get("serve")
    if serve is not None:
        if "error" in serve:
            lines.append(f"Serving FAILED: {_first_line(serve['error'])} (logs/export-serve.log).")
        else:
            lines.append(
                "Serving works: vllm serve answered /v1/completions"
                + (" and /v1/chat/completions." if "chat_completions" in serve["smoke"] else ".")
            )
    if "baseline" not in report["runs"]:
        lat = e["offline"]["latency"]
        lines.append(
            f"Figures: token perplexity {e['offline']['perplexity']['token_perplexity']:.2f}, decode "
            f"{statistics.median(x['decode_tok_s'] or 0 for x in lat):.2f} tokens/s at batch 1, weights "
            f"{e['offline'].get('weight_bytes', 0) / 1e6:.1f} MB in vLLM; give --baseline for ratios "
            "and a verdict."
        )
        if get(e, "serve", "load"):
            lines.append(f"Served output tokens/s by requests in flight: {load_sweep.figures(e['serve']['load'])}.")
        return lines
    r = c.get("token_perplexity_ratio")
    ok_quality = None
    if r is not None:
        pct = (r - 1) * 100
        ok_quality = pct <= ACCEPTABLE_PCT
        label = "close to the baseline" if pct <= CLOSE_PCT else "an acceptable loss" if ok_quality else "a large loss"
        lines.append(
            f"Quality: token perplexity {pct:+.1f}% against the baseline in vLLM ({label}; "
            f"thresholds {CLOSE_PCT:g}% / {ACCEPTABLE_PCT:g}%)."
        )
    g = c.get("greedy")
    if g and g["token_agreement"] is not None:
        lines.append(
            f"Greedy outputs: {g['token_agreement']:.0%} of tokens agree with the baseline; "
            f"{g['identical']}/{g['prompts']} prompts identical."
        )
    speed = [x["tpot_speedup"] for x in c.get("latency", []) if x["tpot_speedup"]]
    if speed:
        s = statistics.median(speed)
        lines.append(
            f"Decode speed at batch 1: {s:.2f}× the baseline's ({'faster' if s >= 1 else 'slower'}); "
            f"offline throughput {c.get('offline_throughput_ratio')}×, "
            f"served {c.get('served_throughput_ratio')}×. {how_it_ran(report)}"
        )
    load = c.get("load") or []
    lines += load_sweep.verdict(load)
    if c.get("weight_bytes_ratio"):
        lines.append(
            f"Memory: weights in vLLM {c['weight_bytes_ratio']:.2f}× the baseline's "
            f"({e['offline']['weight_bytes'] / 1e6:.1f} MB); on disk {c['size_ratio']:.2f}×."
        )
    if ok_quality is not None:
        smaller = (c.get("weight_bytes_ratio") or 1) < 0.9 or (c.get("size_ratio") or 1) < 0.9
        faster = _faster(speed, load)
        served = serve is None or "error" not in serve
        if ok_quality and served and (smaller or faster):
            why = " and ".join(w for w, f in (("smaller", smaller), ("faster", faster)) if f)
            lines.append(
                f"Worth serving: YES: {why}, with quality within {ACCEPTABLE_PCT:g}% perplexity"
                + ("." if faster else "; slower on this platform's kernel.")
                + _load_summary(load)
            )
        else:
            lines.append(
                "Worth serving: NO: "
                + (
                    "quality loss too large."
                    if not ok_quality
                    else "it failed to serve."
                    if not served
                    else "neither smaller nor faster than the baseline."
                )
            )
    return lines


def _faster(speed: list, load: list) -> bool:
    """Faster: under load, when the sweep ran, the export wins more workloads than it loses (a mixed one counts
    neither way); without a sweep, decode at batch 1 is at least the baseline's."""
    if load:
        outcomes = [x["outcome"] for x in load]
        return outcomes.count("wins") > outcomes.count("loses")
    return bool(speed) and statistics.median(speed) >= 1.0


def _load_summary(load: list) -> str:
    """ " Under load it wins decode-heavy at 4, 16 in flight; loses prefill-heavy at 1 in flight." (or "")"""
    parts = []
    for outcome in ("wins", "loses", "mixed"):
        by_mix = {}
        for x in load:
            if x["outcome"] == outcome:
                by_mix.setdefault(x["mix"], []).append(str(x["concurrency"]))
        if by_mix:
            word = "is mixed on" if outcome == "mixed" else outcome
            parts.append(f"{word} " + " and ".join(f"{m} at {', '.join(c)} in flight" for m, c in by_mix.items()))
    return (" Under load it " + "; ".join(parts) + ".") if parts else ""


def _fmt(v, digits=2):
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(head: list, rows: list) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in r) + " |" for r in rows]
    return "\n".join(out)


def _tags(report) -> list:
    return [t for t in ("baseline", "export") if t in report["runs"]]


def _md_quality(report) -> list:
    rows = []
    for t in _tags(report):
        p = get(report["runs"][t], "offline", "perplexity") or {}
        rows.append(
            [
                t,
                p.get("token_perplexity"),
                p.get("word_perplexity"),
                p.get("byte_perplexity"),
                p.get("bits_per_byte"),
                p.get("tokens_scored"),
            ]
        )
    head = ["run", "token ppl", "word ppl", "byte ppl", "bits/byte", "tokens scored"]
    out = ["## Quality (vLLM prompt log-probabilities)", "", _table(head, rows), ""]
    g = get(report, "comparison", "greedy")
    if g:
        out += [
            f"Greedy token agreement: **{g['token_agreement']:.1%}** ({g['identical']}/{g['prompts']} prompts "
            "identical).",
            "",
        ]
    base = {(x["prompt"], x["chat"]): x for x in get(report["runs"].get("baseline", {}), "offline", "greedy") or []}
    div = {(x["prompt"], x["chat"]): x for x in (g or {}).get("rows", [])}
    rows = []
    for x in get(report["runs"]["export"], "offline", "greedy") or []:
        k = (x["prompt"], x["chat"])
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ⏎ ").strip()[:160]  # noqa: E731
        d = div.get(k)
        rows.append(
            [
                ("chat: " if x["chat"] else "") + cell(x["prompt"]),
                cell(base[k]["text"]) if k in base else "–",
                cell(x["text"]),
                "identical"
                if d and d["first_divergence"] is None
                else f"differs from token {d['first_divergence']}"
                if d
                else "–",
            ]
        )
    if rows:
        out += ["### Greedy outputs", "", _table(["prompt", "baseline", "export", "agreement"], rows), ""]
    return out


def _md_speed(report) -> list:
    rows = []
    for t in _tags(report):
        for x in get(report["runs"][t], "offline", "latency") or []:
            rows.append([t, x["input_len"], x["output_len"], x["ttft_ms"], x["tpot_ms"], x["decode_tok_s"]])
    out = [
        "## Latency at batch 1 (offline engine)",
        "",
        _table(["run", "prompt tokens", "output tokens", "TTFT ms", "TPOT ms", "decode tok/s"], rows),
        "",
    ]
    rows = []
    for t in _tags(report):
        o = get(report["runs"][t], "offline", "throughput") or {}
        s = get(report["runs"][t], "serve", "bench") or {}
        rows.append(
            [
                t,
                o.get("requests_per_s"),
                o.get("input_tok_s"),
                o.get("output_tok_s"),
                s.get("request_throughput"),
                s.get("output_throughput"),
                s.get("p50_ttft_ms"),
                s.get("p95_ttft_ms"),
                s.get("p50_tpot_ms"),
                s.get("p95_tpot_ms"),
                s.get("p50_e2el_ms"),
                s.get("p95_e2el_ms"),
            ]
        )
    o = report["options"]
    out += [
        f"## Throughput ({o['num_prompts']} prompts × {o['input_len']} tokens in, {o['output_len']} out)",
        "",
        _table(
            [
                "run",
                "offline req/s",
                "offline in tok/s",
                "offline out tok/s",
                "served req/s",
                "served out tok/s",
                "TTFT p50 ms",
                "TTFT p95 ms",
                "TPOT p50 ms",
                "TPOT p95 ms",
                "e2e p50 ms",
                "e2e p95 ms",
            ],
            rows,
        ),
        "",
        f"Served: `vllm bench serve` (random prompts, at most {o['concurrency']} requests in flight) against "
        "`vllm serve` on 127.0.0.1.",
        "",
    ]
    return out


def _md_memory(report) -> list:
    rows = []
    for t in _tags(report):
        r = report["runs"][t]
        wb = get(r, "offline", "weight_bytes")
        gpu = get(r, "offline", "gpu_peak_bytes")
        rows.append(
            [
                t,
                r["size_mb"],
                round(wb / 1e6, 1) if wb else None,
                get(r, "offline", "peak_rss_mb"),
                get(r, "serve", "peak_rss_mb"),
                round(gpu / 2**20) if gpu else "–",
                get(r, "offline", "quantization") or "none",
                get(r, "offline", "dtype") or "–",
                kernel_summary(r.get("offline")),
                get(r, "offline", "load_s"),
            ]
        )
    return [
        "## Memory, loading and kernels",
        "",
        _table(
            [
                "run",
                "on disk MB",
                "weights in vLLM MB",
                "peak RSS offline MB",
                "peak RSS served MB",
                "GPU peak MiB",
                "vLLM quantization",
                "dtype",
                "kernels",
                "load s",
            ],
            rows,
        ),
        "",
        "dtype: each model runs in the activation dtype this machine runs fastest (bf16 on CPUs with AVX-512 "
        "bf16 or AMX, float32 on AVX2-only CPUs; vLLM's default on GPUs).",
        "",
        "Peak RSS: the sum of proportional set sizes over the run's processes (API server, engine core, "
        "workers), sampled every 0.5 s; it includes vLLM's KV cache reservation.",
        "",
    ]


def _md_errors(report) -> list:
    out = []
    for t in _tags(report):
        for phase in ("offline", "serve"):
            err = get(report["runs"][t], phase, "error")
            if err:
                out += [f"### {t} {phase} run failed", "", "```", err.strip()[-2000:], "```", ""]
    return (["## Errors", ""] + out) if out else []


def markdown(report: dict) -> str:
    eng = report["engine"]
    lines = [
        f"# Validation: {Path(report['export']).name}",
        "",
        f"Export `{report['export']}`"
        + (f" against baseline `{report['baseline']}`" if report["baseline"] else " (no baseline given: no ratios)")
        + ".",
        f"Engine: {eng['vllm']} on {eng['device']} ({eng['cpu']}, {eng.get('cpu_kind', '?')}, "
        f"{eng['cpu_count']} cores); "
        f"{report['created']}.",
        "",
        "## Verdict",
        "",
    ]
    lines += [f"- {v}" for v in report["verdict"]] + [""]
    lines += _md_quality(report) + _md_speed(report) + load_sweep.markdown(report, _tags(report)) + _md_memory(report)
    for t in _tags(report):
        smoke = get(report["runs"][t], "serve", "smoke")
        if smoke:
            lines += [
                f"Serve smoke ({t}): "
                + "; ".join(f"`/v1/{k.replace('_', '/')}` → {v.strip()[:80]!r}" for k, v in smoke.items()),
                "",
            ]
    plots = report.get("plots", {})
    if plots.get("skipped"):
        lines += [f"Plots skipped: {plots['skipped']}", ""]
    for name in ("latency", "throughput", "load", "ppl_vs_size"):
        if name in plots:
            lines += [f"![{name}]({plots[name]})", ""]
    o = report["options"]
    lines += _md_errors(report) + [
        "## How this was measured",
        "",
        f"- Perplexity: `{report['text']}` cut into {o['windows']} windows of {o['window']} tokens (fewer if the "
        "text is shorter), scored by vLLM's prompt log-probabilities; word/byte perplexity and bits per byte as "
        "`compress-export eval` defines them.",
        f"- Greedy: {o['max_new_tokens']} new tokens per prompt; chat prompts through the model's chat template.",
        f"- Latency: our offline runner on vLLM's `LLM` API: TTFT = a 1-token generation, TPOT = (an O-token "
        f"generation − TTFT)/(O − 1), median of {o['latency_repeats']}, fresh prompt text each time (no prefix "
        "cache hits). Offline throughput: all prompts submitted at once, as `vllm bench throughput` does, in the "
        "same engine load.",
        "- Served: vLLM's `vllm bench serve` machinery (`vllm.benchmarks.serve`) as the client.",
        "",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_latency(report, path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for t in _tags(report):
        lat = get(report["runs"][t], "offline", "latency") or []
        if not lat:
            continue
        x = [r["input_len"] for r in lat]
        axes[0].plot(x, [r["ttft_ms"] for r in lat], marker="o", label=t)
        axes[1].plot(x, [r["tpot_ms"] for r in lat], marker="o", label=t)
    lengths = sorted(
        {r["input_len"] for t in _tags(report) for r in get(report["runs"][t], "offline", "latency") or []}
    )
    for ax, title in zip(axes, ("time to first token", "time per output token")):
        ax.set_xscale("log", base=2)
        if lengths:
            ax.set_xticks(lengths, [str(v) for v in lengths])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms")
        ax.set_title(title + " (batch 1)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report, path) -> None:
    plt = _pyplot()
    tags = _tags(report)
    metrics = [
        ("offline", ("offline", "throughput", "output_tok_s")),
        ("served", ("serve", "bench", "output_throughput")),
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(tags))
    for i, t in enumerate(tags):
        vals = [get(report["runs"][t], *keys) or 0 for _, keys in metrics]
        bars = ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=t)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(tags) - 1) / 2 for j in range(len(metrics))], [m for m, _ in metrics])
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_series(
    series: dict,
    path,
    title: str,
    ylabel: str = "token perplexity",
    xlabel: str = "size on disk (MB)",
    logy: bool = True,
) -> None:
    """series: {name: [(x, y, point_label), ...]}; a series of several points is drawn as a line (e.g. one method
    at 8/4/3/2 bits), a single point as a marker with its name. Shared by validate and the seed-table benchmark."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>phX*"
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if len(pts) > 1 else "none", label=name)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(report, folder: Path) -> dict:
    try:
        _pyplot()
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install 'compress-export[report]')"}
    plot_latency(report, folder / "latency.png")
    plot_throughput(report, folder / "throughput.png")
    series = {
        t: [(report["runs"][t]["size_mb"], get(report["runs"][t], "offline", "perplexity", "token_perplexity"), None)]
        for t in _tags(report)
    }
    plot_series(series, folder / "ppl_vs_size.png", "perplexity (vLLM) vs size", logy=False)
    out = {"latency": "latency.png", "throughput": "throughput.png", "ppl_vs_size": "ppl_vs_size.png"}
    if load_sweep.plot(report, _tags(report), folder / "load.png", _pyplot):
        out["load"] = "load.png"
    return out


def write(report: dict, folder: Path) -> None:
    """report.json, the plots and report.md into `folder` (the caller renames it into place)."""
    report["plots"] = plots(report, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report) + "\n")
