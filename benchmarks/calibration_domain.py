"""Is calib.txt's lead over the built-in calibration text on eval.txt a matter of domain? Both directions measured.

  python benchmarks/calibration_domain.py [--size 32x256] [--out benchmarks/results/calibration_domain.txt]

eval.txt and calib.txt are both Shakespeare, so calibrating on calib.txt is in-domain for the usual perplexity and
the built-in text (modern English of many registers) is not. This script measures the mirror image too. The
built-in text is cut at a document boundary near its middle into part A and part B. A is used for calibration, B
is held out as a second evaluation text, on which A is in-domain and calib.txt is not.
SmolLM2 GPTQ W4 g64 (as benchmarks/calibration.py) calibrated on calib.txt and on A (the first N×L tokens of
each), then token perplexity on eval.txt and on B by the shared protocol (16 × 512 windows), next to the
unquantized model's. If the loss from calibrating off-domain is about the same in both directions, the gap on
eval.txt says where the eval comes from, not that the built-in text is a worse calibration set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from calibration import GPTQ_W4G64
from common import TEXT, cli, example_model, measure_rows

from compress_export.io.calibration import builtin_text


def halves(text: str) -> tuple:
    """(A, B): the built-in text cut at the first title line (a short line after a blank one) past its middle,
    so no document is split between calibration and evaluation."""
    lines = text.split("\n")
    total, seen = len(text), 0
    for i, line in enumerate(lines):
        seen += len(line) + 1
        if (
            seen > total // 2
            and i + 2 < len(lines)
            and not line.strip()
            and 0 < len(lines[i + 1]) < 70
            and not lines[i + 1].startswith((" ", '"'))
        ):
            return "\n".join(lines[: i + 1]), "\n".join(lines[i + 1 :])
    raise SystemExit("no document boundary found past the middle of the built-in text")


def ppl(model: Path, text: Path) -> float:
    return round(cli("eval", model, "--text", text)["token_perplexity"], 3)


def measure_on_two_domains(model: str, rows: list, out_json=None) -> list:
    """measure_rows (eval.txt) with each row also scored on the built-in text's held-out half B (column ppl_B)."""
    with tempfile.TemporaryDirectory() as tmp:
        part_b = Path(tmp) / "builtin_b.txt"
        part_b.write_text(halves(builtin_text())[1], encoding="utf-8")

        def on_b(target, rec):
            rec["ppl_B"] = round(cli("eval", target, "--text", part_b)["token_perplexity"], 2)

        cols = ["row", "token_ppl", "ppl_B", "seconds", "peak_rss_mb", "size_mb"]
        return measure_rows(model, rows, out_json, after=on_b, cols=cols)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="32x256", help="calibration SAMPLESxSEQ_LEN (the README demo's by default)")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="also write the report here")
    a = p.parse_args()
    model = Path(a.model or example_model())
    n, seq = a.size.split("x")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        part_a, part_b = halves(builtin_text())
        (tmp / "builtin_a.txt").write_text(part_a, encoding="utf-8")
        (tmp / "builtin_b.txt").write_text(part_b, encoding="utf-8")
        evals = {"eval.txt": TEXT / "eval.txt", "built-in B": tmp / "builtin_b.txt"}
        rows = [{"calibrated on": "– (unquantized)", **{k: ppl(model, v) for k, v in evals.items()}}]
        print(json.dumps(rows[-1]), flush=True)
        for name, data in (("calib.txt", TEXT / "calib.txt"), ("built-in A", tmp / "builtin_a.txt")):
            t = time.time()
            cli(*GPTQ_W4G64, "--dataset", data, "--num-samples", n, "--seq-len", seq, model, "-o", tmp / "o", "-q")
            rows.append({"calibrated on": name, **{k: ppl(tmp / "o", v) for k, v in evals.items()}})
            print(json.dumps(rows[-1]), f"({time.time() - t:.0f} s wall)", flush=True)
            shutil.rmtree(tmp / "o")
    report = [
        f"python benchmarks/calibration_domain.py --size {a.size} ({time.strftime('%Y-%m-%d %H:%M')})",
        f"SmolLM2-135M-Instruct GPTQ W4 g64, {n}×{seq} calibration tokens; token ppl, 16×512 windows each; "
        f"built-in A/B: {len(part_a)} / {len(part_b)} characters",
        "",
        "| calibrated on | eval.txt | vs unquantized | built-in B | vs unquantized |",
        "|---|---|---|---|---|",
    ]
    base = rows[0]
    for r in rows:
        rel = [f"+{100 * (r[k] / base[k] - 1):.1f}%" if r is not base else "–" for k in evals]
        report.append(f"| {r['calibrated on']} | {r['eval.txt']} | {rel[0]} | {r['built-in B']} | {rel[1]} |")
    text = "\n".join(report)
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(text + "\n\nRaw rows:\n" + "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
