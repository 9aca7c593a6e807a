"""Our GGUF against llama.cpp's own quantization, measured by llama.cpp on the shared protocol: one table of file
size and token perplexity for the same model (SmolLM2-135M-Instruct).

  python benchmarks/gguf_quality.py [--skip-install]
      [--rows llamacpp-f16,llamacpp-q4_0,llamacpp-q4_0-q8emb,llamacpp-q4_0-imatrix,ours-rtn,ours-gptq]

Rows (every file is run by llama.cpp's own forward, llama-cpp-python in benchmarks/vs_llamacpp.py's venv):
- llamacpp-f16: llama.cpp's converter (convert_hf_to_gguf.py --outtype f16), the reference;
- llamacpp-q4_0: llama.cpp's quantizer on that file, its default Q4_0 mix (for SmolLM2 it keeps the tied token
  embedding Q8_0 itself: the same tensor types and file size as ours);
- llamacpp-q4_0-q8emb: the same with the token embedding asked for as Q8_0 (--token-embedding-type/
  --output-tensor-type q8_0), for models where llama.cpp's own mix would choose another type;
- llamacpp-q4_0-imatrix: llama.cpp's importance-weighted Q4_0, its own tools built from the same source
  (vs_llamacpp.ensure_tools): `llama-imatrix -c 512 --chunks 64` over calib.txt (the 64 × 512 tokens our passes
  calibrate on), then `llama-quantize --imatrix ... Q4_0`. Checked first: llama-quantize without --imatrix writes
  the very file the Python quantize call wrote for llamacpp-q4_0, so the importance matrix is the only difference;
- ours-rtn / ours-gptq: `compress-export --format gguf --method rtn|gptq --group-size 32` (GPTQ on calib.txt's
  64 × 512 tokens, the shared protocol), every linear Q4_0 holding our codes and scales exactly, token embedding
  Q8_0.
Token perplexity: eval.txt tokenized whole without BOS by the model's tokenizer, the first 16 non-overlapping
512-token windows, llama.cpp's logits (logits_all), mean loss per window, then over windows (as `compress-export
eval`).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import vs_llamacpp as L
from common import TEXT, example_model

ROWS = ("llamacpp-f16", "llamacpp-q4_0", "llamacpp-q4_0-q8emb", "llamacpp-q4_0-imatrix", "ours-rtn", "ours-gptq")
CHUNKS = 64  # × 512 tokens: the shared protocol's calibration set
GGML_Q8_0 = 8


def ppl(path: Path, windows) -> dict:
    r = L.llamacpp({"do": "losses", "gguf": str(path), "windows": [w.tolist() for w in windows]})
    means = [sum(x) / len(x) for x in r["losses"]]
    return {"token_ppl": round(math.exp(sum(means) / len(means)), 3), "seconds": r["seconds"]}


def ours(model: Path, method: str, fresh: Path) -> Path:
    """Our export, made afresh on every run into `fresh` (a temporary folder of this run's): its file depends on our
    code, which no cache key here can see (an export kept from an earlier commit would be scored as this one's)."""
    import subprocess

    out = fresh / f"ours-{method}"
    cmd = [sys.executable, "-m", "compress_export.cli.main", "--format", "gguf", "--method", method]
    cmd += ["--group-size", "32", "--dataset", str(TEXT / "calib.txt"), str(model), "-o", str(out), "-q"]
    subprocess.run(cmd, check=True)
    (f,) = out.glob("*.gguf")
    return f


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--skip-install", action="store_true")
    a = p.parse_args()
    rows = a.rows.split(",")
    llama_dir = L.ensure_llamacpp(a.skip_install)
    model = Path(example_model())
    _, _, windows = L.protocol_ids(model)
    base = L.ggufs(model, "smollm2", llama_dir)
    work = L.WORK / "gguf_quality" / L.fingerprint(model)
    work.mkdir(parents=True, exist_ok=True)
    q8emb = work / "llamacpp-q4_0-q8emb.gguf"
    if "llamacpp-q4_0-q8emb" in rows and not q8emb.exists():
        L.llamacpp({"do": "quantize", "src": str(base["F16"]), "dst": str(q8emb), "embeddings": GGML_Q8_0})
    files = {"llamacpp-f16": base["F16"], "llamacpp-q4_0": base["Q4_0"], "llamacpp-q4_0-q8emb": q8emb}
    if "llamacpp-q4_0-imatrix" in rows:
        tools = L.ensure_tools(llama_dir, a.skip_install)
        plain = work / "llamacpp-q4_0-cli.gguf"
        if not plain.exists():  # written beside, renamed when whole: a stopped run leaves no half file to compare
            L.run_tool(tools / "llama-quantize", base["F16"], plain.with_suffix(".part"), "Q4_0", L.THREADS)
            plain.with_suffix(".part").replace(plain)
        if plain.read_bytes() != base["Q4_0"].read_bytes():  # the rows would differ by more than the matrix
            raise SystemExit(f"llama-quantize without --imatrix wrote {plain}, not the Python call's {base['Q4_0']}")
        print("llama-quantize without --imatrix writes the Python quantize call's file byte for byte: True")
        files["llamacpp-q4_0-imatrix"] = L.imatrix_q4_0(base["F16"], TEXT / "calib.txt", tools, CHUNKS)
    print(f"llama.cpp {L.llamacpp({'do': 'info'})['version']}; model {model}")
    print("| file | tensor types | size MB | llama.cpp token ppl | seconds |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as fresh:
        for row in rows:
            t = time.time()
            path = files.get(row) or ours(model, row.split("-", 1)[1], Path(fresh))
            m = ppl(path, windows)
            types = L.tensor_types(path, llama_dir)
            print(f"| {row} | {types} | {path.stat().st_size / 1e6:.1f} | {m['token_ppl']} | {time.time() - t:.0f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
