"""The load sweep of `compress-export validate`: served throughput and latency percentiles at several concurrency
caps for a prefill-heavy and a decode-heavy workload, and which of those workloads the export wins or loses.

Every figure is `vllm bench serve`'s own (its result dict: output tokens/s, TTFT and TPOT percentiles); this module
plans the points, compares export and baseline point by point, words the verdict and draws the tables and plot.
Pure functions of the measured runs: no vLLM import.

A point's JSON (report.json, runs[tag].serve.load[i]): {"mix", "input_len", "output_len", "concurrency",
"num_prompts", "seed"} plus vLLM's figures ("output_throughput", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
"p50_tpot_ms", ..., "completed", "failed"), or "error" when that point's client failed.
"""

from __future__ import annotations

from compress_export.core.errors import UserError

# (name, prompt tokens, output tokens): long prompts with short answers, and short prompts with long answers
MIXES = (("prefill-heavy", 512, 16), ("decode-heavy", 32, 128))
CONCURRENCY = (1, 4, 16)
PERCENTILES = (50, 90, 99)

# A figure wins or loses only beyond this change (%): the machine's run-to-run noise. Tail percentiles (p99 of a
# few requests is nearly the maximum) get the looser bound.
TIE_PCT, TAIL_TIE_PCT = 5.0, 15.0


def parse_concurrency(spec: str) -> tuple:
    """ "1,4,16" → (1, 4, 16): distinct caps, in increasing order."""
    try:
        out = tuple(sorted({int(v) for v in spec.split(",")}))
        if not out or out[0] < 1:
            raise ValueError
        return out
    except ValueError:
        raise UserError(f"--load-concurrency {spec!r}: give requests in flight, e.g. 1,4,16 (each ≥ 1)") from None


def requests_for(concurrency: int, load_prompts: int) -> int:
    """Requests one point sends: at least `load_prompts`, and two rounds of its cap, so that the cap is reached
    and kept while the first round's answers finish."""
    return max(load_prompts, 2 * concurrency)


def plan(mixes, concurrency, load_prompts: int) -> list:
    """The sweep's points, mix-major. Each point gets its own seed: vllm bench serve's random prompts then differ
    between points (no prefix-cache hits carried from one point into the next), and are the same for the export
    and the baseline (the same workload for both)."""
    pts = []
    for name, inp, out in mixes:
        for c in concurrency:
            pts.append(
                {
                    "mix": name,
                    "input_len": inp,
                    "output_len": out,
                    "concurrency": c,
                    "num_prompts": requests_for(c, load_prompts),
                    "seed": len(pts) + 1,  # seed 0 is the classic served point's
                }
            )
    return pts


def _change_pct(e, b):
    """Export over baseline, in % (+ = export larger); None where either is missing or the baseline is 0."""
    if e is None or b in (None, 0):
        return None
    return round((e / b - 1) * 100, 1)


def _judge(cmp: dict, e: dict) -> tuple:
    """The figures of one point that win and lose, each worded with its number."""
    wins, loses = [], []
    if e.get("failed"):
        loses.append(f"{e['failed']} of {e.get('num_prompts', '?')} requests failed")
    r = cmp.get("output_throughput_ratio")
    if r is not None and abs(r - 1) * 100 > TIE_PCT:
        (wins if r > 1 else loses).append(f"{r:.2f}× output tokens/s")
    for metric in ("ttft", "tpot"):
        for p, tie in ((50, TIE_PCT), (99, TAIL_TIE_PCT)):
            ch = cmp.get(f"{metric}_p{p}_change_pct")
            if ch is not None and abs(ch) > tie:  # latency: lower is better
                (loses if ch > 0 else wins).append(f"{metric.upper()} p{p} {ch:+.0f}%")
    return wins, loses


def compare_point(e: dict, b: dict) -> dict:
    """One (mix, concurrency) point: export / baseline throughput, latency changes in %, and the outcome."""
    out = {k: e.get(k, b.get(k)) for k in ("mix", "input_len", "output_len", "concurrency")}
    if "error" in e or "error" in b:
        out["outcome"] = "loses" if "error" in e else "not compared"  # failed requests lose, whatever the baseline did
        out["wins"], out["loses"] = [], (["the export's requests failed"] if out["outcome"] == "loses" else [])
        return out
    e_tp, b_tp = e.get("output_throughput"), b.get("output_throughput")
    out["output_throughput_ratio"] = round(e_tp / b_tp, 3) if e_tp is not None and b_tp else None
    for metric in ("ttft", "tpot"):
        for p in PERCENTILES:
            out[f"{metric}_p{p}_change_pct"] = _change_pct(e.get(f"p{p}_{metric}_ms"), b.get(f"p{p}_{metric}_ms"))
    wins, loses = _judge(out, e)
    out["wins"], out["loses"] = wins, loses
    out["outcome"] = ("mixed" if loses else "wins") if wins else ("loses" if loses else "ties")
    return out


def compare(e_points: list, b_points: list) -> list:
    """Point by point, matched on (mix, concurrency); points only one run has are left out."""
    base = {(p["mix"], p["concurrency"]): p for p in b_points or []}
    return [
        compare_point(p, base[(p["mix"], p["concurrency"])])
        for p in e_points or []
        if (p["mix"], p["concurrency"]) in base
    ]


def describe(cmp: dict) -> str:
    """ "decode-heavy at 16 in flight: 1.40× output tokens/s (wins), TTFT p50 +12% (loses)" """
    where = f"{cmp['mix']} at {cmp['concurrency']} in flight: "
    if cmp["outcome"] == "not compared":
        return where + "not compared (the baseline's requests failed)"
    parts = [f"{w} (wins)" for w in cmp["wins"]] + [f"{x} (loses)" for x in cmp["loses"]]
    r = cmp.get("output_throughput_ratio")
    if not parts:
        return where + (f"{r:.2f}× output tokens/s, " if r is not None else "") + f"all within ±{TIE_PCT:g}% (ties)"
    if r is not None and not any("output tokens/s" in x for x in cmp["wins"] + cmp["loses"]):
        parts.append(f"{r:.2f}× output tokens/s (even)")
    return where + ", ".join(parts)


def verdict(cmps: list) -> list:
    """A count of the workloads the export wins, loses, splits or ties, then one line per workload."""
    if not cmps:
        return []
    n = {k: sum(c["outcome"] == k for c in cmps) for k in ("wins", "loses", "mixed", "ties")}
    head = (
        f"Under load (vllm bench serve): the export wins {n['wins']} of {len(cmps)} workloads, loses {n['loses']}, "
        f"{n['mixed']} mixed, {n['ties']} even (a figure counts beyond ±{TIE_PCT:g}% for output tokens/s and p50 "
        f"TTFT/TPOT, ±{TAIL_TIE_PCT:g}% for p99)."
    )
    return [head] + ["  " + describe(c) for c in cmps]


def figures(points: list) -> str:
    """Without a baseline: each mix's output tokens/s by concurrency."""
    by_mix = {}
    for p in points or []:
        v = "failed" if "error" in p else f"{p.get('output_throughput') or 0:.1f}"
        by_mix.setdefault(p["mix"], []).append(f"{v} at {p['concurrency']}")
    return "; ".join(f"{m} {', '.join(v)}" for m, v in by_mix.items())


def _fmt(v):
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _row(c: int, tag: str, p: dict, note: str) -> list:
    if "error" in p:
        return [str(c), tag, str(p.get("num_prompts", "–")), "failed"] + ["–"] * 6 + [note]
    lat = [_fmt(p.get(f"p{q}_{m}_ms")) for m in ("ttft", "tpot") for q in PERCENTILES]
    done = f"{p.get('completed', '–')}/{p.get('num_prompts', '–')}"
    return [str(c), tag, done, _fmt(p.get("output_throughput"))] + lat + [note]


def table(mix: str, runs: dict, cmps: list) -> list:
    """Markdown lines: one mix's table, a row per (concurrency, run); the export's row says how it compares."""
    pts = {t: {p["concurrency"]: p for p in r if p["mix"] == mix} for t, r in runs.items()}
    cm = {c["concurrency"]: c for c in cmps if c["mix"] == mix}
    any_pt = next((p for r in pts.values() for p in r.values()), None)
    if any_pt is None:
        return []
    head = ["in flight", "run", "requests done", "out tok/s"]
    head += [f"{m} p{q} ms" for m in ("TTFT", "TPOT") for q in PERCENTILES] + ["export vs baseline"]
    lines = [
        f"### {mix}: {any_pt['input_len']} prompt tokens, {any_pt['output_len']} output tokens",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for c in sorted({c for r in pts.values() for c in r}):
        for tag in ("baseline", "export"):
            if c in pts.get(tag, {}):
                note = describe(cm[c]).split(": ", 1)[1] if tag == "export" and c in cm else "–"
                lines.append("| " + " | ".join(_row(c, tag, pts[tag][c], note)) + " |")
    return lines + [""]


def markdown(report: dict, tags: list) -> list:
    """The report's load section: a table per mix."""
    runs = {t: (report["runs"][t].get("serve") or {}).get("load") or [] for t in tags}
    if not any(runs.values()):
        return []
    cmps = (report.get("comparison") or {}).get("load") or []
    mixes = list(dict.fromkeys(p["mix"] for r in runs.values() for p in r))
    out = ["## Served under load (`vllm bench serve`)", ""]
    for m in mixes:
        out += table(m, runs, cmps)
    o = report["options"]
    out += [
        f"Each point: random prompts of fixed length (`--ignore-eos`: every answer has its full length), at most "
        f"N requests in flight, max({o.get('load_prompts')}, 2 × N) requests. TTFT counts from when the client sends "
        "a request, so it includes the server's queueing behind the requests already in flight. Percentiles over "
        "that point's requests. Win/lose thresholds: "
        f"±{TIE_PCT:g}% on output tokens/s and p50, ±{TAIL_TIE_PCT:g}% on p99.",
        "",
    ]
    return out


def plot(report: dict, tags: list, path, pyplot) -> bool:
    """load.png: per mix (columns), output tokens/s, TTFT p50 and TPOT p50 against requests in flight (rows).
    False when no run has load points."""
    runs = {t: (report["runs"][t].get("serve") or {}).get("load") or [] for t in tags}
    mixes = list(dict.fromkeys(p["mix"] for r in runs.values() for p in r))
    if not mixes:
        return False
    plt = pyplot()
    rows = (
        ("output_throughput", "output tokens / s"),
        ("p50_ttft_ms", "TTFT p50 (ms)"),
        ("p50_tpot_ms", "TPOT p50 (ms)"),
    )
    fig, axes = plt.subplots(len(rows), len(mixes), figsize=(5 * len(mixes), 9), squeeze=False)
    for j, mix in enumerate(mixes):
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            for t in tags:
                pts = sorted(
                    (p for p in runs[t] if p["mix"] == mix and p.get(key) is not None), key=lambda p: p["concurrency"]
                )
                if pts:
                    ax.plot([p["concurrency"] for p in pts], [p[key] for p in pts], marker="o", label=t)
            ax.set_xscale("log", base=2)
            caps = sorted({p["concurrency"] for r in runs.values() for p in r if p["mix"] == mix})
            ax.set_xticks(caps, [str(c) for c in caps])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("requests in flight")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0][j].set_title(mix)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
