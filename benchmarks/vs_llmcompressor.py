"""GPTQ W4 g64 on SmolLM2: compress-export beside llm-compressor 0.14 `oneshot`, same scheme, same calibration.

  python benchmarks/vs_llmcompressor.py

llm-compressor is installed into its own venv (.bench/llmc-venv, created on first use; never a dependency of ours).
Both runs calibrate on the first 64×512 tokens of ../shared/data/text/calib.txt, symmetric 4-bit, group 64,
static act-order, dampening 0.01; llm-compressor otherwise at its defaults. Each run is one subprocess timed from
start to a saved checkpoint (model load included), with its own peak RSS (wait4). Perplexity of both on the shared
protocol: ours through our loader, llm-compressor's through transformers + compressed-tensors in its venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TEXT, bench_venv, example_model

LLMC = "llmcompressor==0.14.0.1"

LLMC_SCRIPT = r'''
import sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
model_dir, calib, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model_dir)
ids = tok(open(calib, encoding="utf-8").read(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
ids = ids[: 64 * 512].view(64, 512)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
recipe = GPTQModifier(ignore=["lm_head"], actorder="static", dampening_frac=0.01, config_groups={"g": {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}})
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=512, num_calibration_samples=64)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
'''

EVAL_SCRIPT = r'''
import sys, json, torch
sys.path.insert(0, sys.argv[3])
from transformers import AutoModelForCausalLM, AutoTokenizer
from compress_export.pipeline.evaluate import perplexity
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
t = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps(perplexity(m, t, open(sys.argv[2], encoding="utf-8").read()).as_dict()))
'''


def ensure_venv() -> Path:
    return bench_venv("llmc-venv", LLMC)


def run_with_rss(cmd) -> dict:
    """Run cmd; wall seconds and the child's own peak RSS (MB) from wait4."""
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = []
    for line in p.stdout:
        log.append(line.decode(errors="replace"))
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{''.join(log)[-4000:]}")
    return {"seconds": round(time.time() - t, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024)}


def main():
    py = ensure_venv()
    model = example_model()
    calib, evalt = TEXT / "calib.txt", TEXT / "eval.txt"
    with tempfile.TemporaryDirectory() as tmp:
        ours_out, theirs_out = Path(tmp) / "ours", Path(tmp) / "llmc"
        script = Path(tmp) / "llmc_run.py"
        script.write_text(LLMC_SCRIPT)
        ours = run_with_rss(
            [
                sys.executable,
                "-m",
                "compress_export.cli.main",
                "--method",
                "gptq",
                "--bits",
                "4",
                "--group-size",
                "64",
                "--act-order",
                "static",
                "--damp",
                "0.01",
                "--dataset",
                str(calib),
                "--num-samples",
                "64",
                "--seq-len",
                "512",
                "-q",
                model,
                "-o",
                str(ours_out),
            ]
        )
        theirs = run_with_rss([str(py), str(script), model, str(calib), str(theirs_out)])
        ev_ours = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "compress_export.cli.main",
                    "eval",
                    str(ours_out),
                    "--text",
                    str(evalt),
                    "--json",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        (Path(tmp) / "ev.py").write_text(EVAL_SCRIPT)
        r = subprocess.run(
            [str(py), str(Path(tmp) / "ev.py"), str(theirs_out), str(evalt), str(ROOT)], capture_output=True, text=True
        )
        ev_theirs = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
        if r.returncode:
            print("llm-compressor export could not be evaluated:", r.stderr[-2000:])
    rows = [("compress-export", ours, ev_ours), ("llm-compressor 0.14 oneshot", theirs, ev_theirs)]
    print("| run | seconds | peak RSS MB | token ppl |\n|---|---|---|---|")
    for name, run, ev in rows:
        print(f"| {name} | {run['seconds']} | {run['peak_rss_mb']} | {ev.get('token_perplexity', float('nan')):.2f} |")
    print(f"speed-up: {theirs['seconds'] / ours['seconds']:.2f}x")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
