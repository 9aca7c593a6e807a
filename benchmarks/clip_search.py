"""GPTQ W4/W3 g64 rows made by this checkout's code and by another checkout's, in one run. Made for the clip search
under the Hessian (each static group's range shrink chosen by its output error; commits bed1f55–0f12cb1, reverted:
benchmarks/README.md, "Clip search under the Hessian"): run from a checkout of 0f12cb1 with --before a checkout of
ac1e395 (the plain |Δw|^2.4 search, the default) to reproduce its table.

  python benchmarks/clip_search.py [--before CHECKOUT] [--bits 4,3] [--out FILE.json]

`compress-export --format gptq --method gptq --bits B --group-size 64` on calib.txt's first 64 × 512 tokens, the
defaults otherwise (static act-order, clip search, asymmetric calibration α 0.5), SmolLM2-135M. With --before, the
same rows are also made by the code of another checkout (e.g. `git worktree add /tmp/before ac1e395`): its
package is put first on PYTHONPATH for those rows' exports and evals only.

Token perplexity by the shared protocol on eval.txt, on the built-in text's held-out half B (modern English, another
domain) and on the dev split (calib.txt after its first 60%). The change was chosen on B and dev; eval.txt is
reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import example_model
from symmetric_grid import gptq_part, texts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="a checkout whose compress_export makes the 'before' rows")
    p.add_argument("--bits", default="4,3")
    p.add_argument("--model", help="model directory (default: the built-in SmolLM2 example)")
    p.add_argument("--out", help="also write the rows here as JSON")
    a = p.parse_args()
    model_dir = a.model or example_model()
    bits = [int(b) for b in a.bits.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = texts(Path(tmp))
        rows += gptq_part(model_dir, paths, "now-", [(b, 64) for b in bits])
        if a.before:
            before = Path(a.before).resolve()
            if not (before / "compress_export" / "__init__.py").is_file():
                raise SystemExit(f"--before {before}: no compress_export package there (give a checkout's root)")
            saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
            # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (this checkout, when run from
            # its root) ahead of PYTHONPATH, and the "before" rows would quietly run the current code
            os.environ.update(PYTHONPATH=str(before), PYTHONSAFEPATH="1")
            try:
                got = subprocess.run(
                    [sys.executable, "-c", "import compress_export; print(compress_export.__file__)"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
                if not Path(got).resolve().is_relative_to(before):
                    raise SystemExit(f"--before {before}: a child process still imports {got}")
                rows += gptq_part(model_dir, paths, "before-", [(b, 64) for b in bits])
            finally:
                for k, v in saved.items():
                    os.environ.pop(k, None)
                    if v is not None:
                        os.environ[k] = v
    print("\n| row | eval.txt | B | dev |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['token_ppl']} | {r['B']} | {r['dev']} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
