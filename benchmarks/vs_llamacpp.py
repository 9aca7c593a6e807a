"""Side by side with llama.cpp in one run: the same models as GGUF F16 and Q4_0 in llama.cpp, beside the original
and our W4 export in vLLM. Batch-1 prefill and decode tokens/s, each engine's quantized / original ratio, and
token perplexity on the shared protocol.

  python benchmarks/vs_llamacpp.py [--models smollm2,1b] [--tokens 64] [--prompt-tokens 128] [--repeats 3]
                                   [--dtypes float32,bfloat16] [--skip-install] [--out FILE]

llama.cpp comes from llama-cpp-python, built from its sdist (this CPU's ISA; on AMX CPUs without AMX, see cmake_args) into
its own venv, ~/.cache/compress-export/llamacpp-venv; it is never a dependency of ours. The first run builds it
(about 20 minutes on 2 cores); later runs reuse it (--skip-install: fail instead of building). The GGUF files
come from llama.cpp's own converter (vendor/llama.cpp/convert_hf_to_gguf.py of that sdist, run by our venv's
Python for torch/transformers, with the gguf package vendored next to it) and its own quantizer
(llama_cpp.llama_model_quantize, default Q4_0 recipe); they are cached under ~/.cache/compress-export/llamacpp/gguf,
keyed by a hash of the model's files.

- smollm2: SmolLM2-135M-Instruct; ours is its GPTQ W4 g64 export (benchmarks/vllm_speed.py's recipe).
- 1b: the random-weight 1.07 B Llama of benchmarks/common.random_llama; ours is RTN W4 g128. Its perplexity is
  noise and is not measured.

What each figure is, the same for both engines (batch 1, greedy, 2 threads: vLLM's CPU setting, and llama.cpp's
n_threads = n_threads_batch = 2):
- prefill tok/s = P / time to the first token of a P-token prompt (--prompt-tokens), cut from eval.txt, a fresh
  prompt each repeat (no prefix cache);
- decode tok/s = --tokens new tokens / wall time of a generation from a short prompt ("The capital of France is"),
  as benchmarks/vllm_speed.py measures it (common.vllm_check);
- medians of --repeats. vLLM: prefill from `compress_export.integrations.vllm_offline`'s latency run (what
  `validate` uses), decode from vllm_check, each model in its fastest of --dtypes, as in vllm_speed.py.
  llama.cpp: llama_decode of the whole prompt (n_batch 512), then one llama_decode per new token, argmax of its
  logits.
- token perplexity: eval.txt tokenized whole without BOS by the model's tokenizer, the first 16 non-overlapping
  512-token windows, mean loss over each window's 511 predicted tokens, then over windows
  (compress_export.pipeline.evaluate). Ours = `compress-export eval` (our loader) and vLLM's prompt
  log-probabilities; llama.cpp's = the same token ids evaluated with logits_all=True, log-softmax of its logits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path.home() / ".cache" / "compress-export"
VENV = CACHE / "llamacpp-venv"
WORK = CACHE / "llamacpp"  # the sdist, its unpacked source (the converter), the GGUF files
# a native build (this CPU's AVX2/AVX-512/VNNI), as a user building llama.cpp on this machine would get
COMMON_ARGS = "-DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
# -DGGML_<flag>=ON for each x86 extension llama.cpp builds for, named by /proc/cpuinfo's flag
X86_FLAGS = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx_vnni": "AVX_VNNI",
    "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
}


def cmake_args() -> str:
    """A native build, except on CPUs with AMX: llama.cpp 0.3.36's AMX matmul (built by -march=native there)
    crashed with SIGSEGV in ggml_backend_amx_mul_mat at the first decode on an AMX Xeon, for its own GGUF files
    too. There every other extension of this CPU is named explicitly and AMX is left out."""
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    if "amx_int8" not in flags:
        return f"-DGGML_NATIVE=ON {COMMON_ARGS}"
    on = " ".join(f"-DGGML_{v}=ON" for k, v in X86_FLAGS.items() if k in flags)
    return f"-DGGML_NATIVE=OFF {on} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF {COMMON_ARGS}"


THREADS = 2  # vLLM's CPU engine runs on 2 threads here (integrations/vllm_launch.cpu_environment)
DECODE_PROMPT = "The capital of France is"  # vllm_check's default prompt: the decode runs start from it
WINDOW, WINDOWS = 512, 16  # the protocol (compress_export.pipeline.evaluate.WINDOW/WINDOWS)


# ---------------------------------------------------------------- the llama.cpp side (runs in its own venv)
# worker(): `VENV/bin/python vs_llamacpp.py --worker SPEC OUT`; stdlib, numpy and llama_cpp only.


def _worker_load(path: str, n_ctx: int, logits_all: bool):
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=logits_all,
        verbose=False,
    )


def _worker_speed(spec: dict) -> dict:
    """Batch-1 prefill tokens/s (median time to first token over spec["prompts"]) and decode tokens/s as
    vllm_check times it (spec["decode_prompt"], then spec["tokens"] new tokens: tokens / wall time, median)."""
    import numpy as np

    tokens, prompts = spec["tokens"], spec["prompts"]
    llm = _worker_load(spec["gguf"], max(len(prompts[0]), len(spec["decode_prompt"]) + tokens) + 8, False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # greedy: argmax of the last position's logits
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def generate(prompt: list, n_new: int) -> float:
        llm.reset()  # the next eval drops the KV cache from position 0: no prefix reuse
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = next_token()
        for _ in range(n_new - 1):  # EOS ignored, as vllm_check's ignore_eos
            llm.eval([tok])
            tok = next_token()
        return time.perf_counter() - t0

    generate(prompts[0][:16], 4)  # warm-up: weight repacking, page-in, thread pool start
    ttft = statistics.median(generate(p, 1) for p in prompts)
    rate = statistics.median(tokens / generate(spec["decode_prompt"], tokens) for _ in prompts)
    return {
        "prefill_tok_s": round(len(prompts[0]) / ttft, 2),
        "decode_tok_s": round(rate, 2),
        "ttft_ms": round(ttft * 1e3, 2),
    }


def _worker_losses(spec: dict) -> dict:
    """Per-token losses (nats) of each window: −log softmax(logits at i)[ids[i+1]] for i < window − 1."""
    import numpy as np

    windows = spec["windows"]
    llm = _worker_load(spec["gguf"], len(windows[0]), True)
    losses = []
    t0 = time.perf_counter()
    for ids in windows:
        llm.reset()
        llm.eval(ids)  # no BOS: the protocol scores the token ids as given
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        losses.append((lse - logits[np.arange(len(ids) - 1), ids[1:]]).tolist())
    return {"losses": losses, "seconds": round(time.perf_counter() - t0, 2)}


def _worker_quantize(spec: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0  # llama.cpp's default Q4_0 mix (its own tensor choices)
    params.nthread = THREADS
    if spec.get("embeddings"):  # the token embedding (the output too, when tied) in this GGML type, not Q6_K
        params.token_embedding_type = params.output_tensor_type = spec["embeddings"]
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), params)
    if rc:
        raise SystemExit(f"llama_model_quantize {spec['src']} → Q4_0 failed with {rc}")
    return {"dst": spec["dst"]}


def _worker_info(spec: dict) -> dict:
    import llama_cpp

    return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    do = {"speed": _worker_speed, "losses": _worker_losses, "quantize": _worker_quantize, "info": _worker_info}
    Path(out_path).write_text(json.dumps(do[spec["do"]](spec)))


def llamacpp(spec: dict) -> dict:
    """Run one worker task in llama.cpp's venv (a fresh process each: one model loaded at a time)."""
    with tempfile.TemporaryDirectory() as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec))
        r = subprocess.run(
            [str(VENV / "bin" / "python"), __file__, "--worker", str(sp), str(op)], capture_output=True, text=True
        )
        if r.returncode or not op.exists():
            raise SystemExit(f"llama.cpp worker ({spec['do']}) failed:\n{(r.stderr or r.stdout)[-3000:]}")
        return json.loads(op.read_text())


# ---------------------------------------------------------------- install and convert (our side)


def _pip(*args, env=None) -> None:
    cmd = ["nice", "-n", "15", str(VENV / "bin" / "python"), "-m", "pip", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(r.stderr or r.stdout)[-3000:]}")


def ensure_llamacpp(skip_install: bool) -> Path:
    """llama-cpp-python in its own venv, built for this CPU; its unpacked sdist's vendor/llama.cpp (returned)."""
    sdist = WORK / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    src = WORK / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    built_with = VENV / "cmake-args.txt"  # a venv built with other flags (an older recipe) is built again
    ok = (
        built_with.exists()
        and built_with.read_text() == cmake_args()
        and not subprocess.run(
            [
                str(VENV / "bin" / "python"),
                "-c",
                f"import llama_cpp; assert llama_cpp.__version__ == '{LLAMA_CPP_PYTHON}'",
            ],
            capture_output=True,
        ).returncode
    )
    if not ok or not sdist.exists():
        if skip_install:
            raise SystemExit(f"--skip-install: no llama-cpp-python {LLAMA_CPP_PYTHON} in {VENV} (or no {sdist})")
        print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} into {VENV} (once; ~20 min on 2 cores)", flush=True)
        if not (VENV / "bin" / "python").exists():
            subprocess.run([shutil.which("python3") or "python3", "-m", "venv", str(VENV)], check=True)
        if not sdist.exists():
            _pip(
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "-d",
                sdist.parent,
            )
        env = {**os.environ, "CMAKE_ARGS": cmake_args(), "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
        _pip("install", "--force-reinstall", "--no-cache-dir", str(sdist), "numpy", env=env)
        built_with.write_text(cmake_args())
    if not (src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xzf", str(sdist), "-C", str(src.parent)], check=True)
    return src / "vendor" / "llama.cpp"


def fingerprint(model: Path) -> str:
    """A hash of the model folder's files (names, sizes, contents): the GGUF cache key."""
    h = hashlib.sha256()
    for f in sorted(p for p in model.iterdir() if p.is_file()):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


TOOLS = WORK / "tools"  # llama.cpp's own command-line llama-imatrix and llama-quantize


def ensure_tools(llama_dir: Path, skip_install: bool) -> Path:
    """llama.cpp's llama-imatrix and llama-quantize (llama-cpp-python ships neither, and its quantize call takes no
    importance matrix), built with cmake from the very source the Python package was built from, with the same
    flags; returns their folder."""
    want = ("llama-imatrix", "llama-quantize")
    bin_dir, stamp, build = TOOLS / "bin", TOOLS / "cmake-args.txt", TOOLS / "build"
    recipe = f"{LLAMA_CPP_PYTHON} {cmake_args()}"  # tools of another llama.cpp source or flags are built again
    if all((bin_dir / t).is_file() for t in want) and stamp.is_file() and stamp.read_text() == recipe:
        return bin_dir
    if skip_install:
        raise SystemExit(f"--skip-install: no llama.cpp tools in {bin_dir}")
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        raise SystemExit("building llama-imatrix needs cmake and a C++ compiler (apt install cmake g++)")
    print("building llama.cpp's llama-imatrix and llama-quantize (once; ~10 min on 2 cores)", flush=True)
    args = cmake_args().split() + ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = ["cmake", "-S", str(llama_dir), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release", *args]
    run_tool(*cfg)
    run_tool("cmake", "--build", build, "--target", *want, "-j", 2)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for t in want:
        shutil.copy2(build / "bin" / t, bin_dir / t)
    stamp.write_text(recipe)
    return bin_dir


def imatrix_q4_0(f16: Path, text: Path, tools: Path, chunks: int) -> Path:
    """llama.cpp's importance-weighted Q4_0: llama-imatrix over `chunks` × 512 tokens of `text` (the run's
    calibration text, as much of it as our passes see), then llama-quantize --imatrix (its default Q4_0 mix)."""
    text_id = hashlib.sha256(text.read_bytes()).hexdigest()[:12]  # another calibration text, another matrix
    imatrix = f16.with_name(f"{f16.stem}-imatrix-{chunks}-{text_id}.gguf")
    part = imatrix.with_name(f"{imatrix.stem}.part.gguf")  # llama-imatrix saves every 10 chunks: never half a file
    out = f16.with_name(f"{f16.stem}-imatrix{chunks}-{text_id}-Q4_0.gguf")
    if not imatrix.exists():
        cmd = ["-m", f16, "-f", text, "-o", part, "-c", WINDOW, "--chunks", chunks, "--no-ppl", "-t", THREADS]
        run_tool(tools / "llama-imatrix", *cmd)
        part.replace(imatrix)
    if not out.exists():
        run_tool(tools / "llama-quantize", "--imatrix", imatrix, f16, out.with_suffix(".part"), "Q4_0", THREADS)
        out.with_suffix(".part").replace(out)
    return out


def run_tool(*cmd) -> None:
    r = subprocess.run(["nice", "-n", "15", *map(str, cmd)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{Path(str(cmd[0])).name} failed:\n{(r.stdout + r.stderr)[-3000:]}")


def ggufs(model: Path, tag: str, llama_dir: Path) -> dict:
    """{"F16": path, "Q4_0": path}, converted by llama.cpp's own tools once per model content."""
    out = WORK / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    key = f"{tag}-{fingerprint(model)}"
    f16, q4 = out / f"{key}-F16.gguf", out / f"{key}-Q4_0.gguf"
    if not f16.exists():
        tmp = f16.with_suffix(".part")
        cmd = [sys.executable, "convert_hf_to_gguf.py", str(model), "--outtype", "f16", "--outfile", str(tmp)]
        r = subprocess.run(["nice", "-n", "15", *cmd], cwd=llama_dir, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"convert_hf_to_gguf.py failed on {model}:\n{r.stderr[-3000:]}")
        tmp.replace(f16)
    if not q4.exists():
        tmp = q4.with_suffix(".part")
        llamacpp({"do": "quantize", "src": str(f16), "dst": str(tmp)})
        tmp.replace(q4)
    return {"F16": f16, "Q4_0": q4}


def tensor_types(path: Path, llama_dir: Path) -> str:
    """What the file holds, e.g. "Q4_0 ×210, Q6_K ×1, F32 ×61" (llama.cpp's Q4_0 recipe keeps some tensors
    wider), read with the gguf package vendored beside the converter."""
    sys.path.insert(0, str(llama_dir / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    counts = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- measuring both engines


def protocol_ids(model: Path):
    """The shared text's token ids (whole, no BOS) and the protocol's windows [16, 512]."""
    import torch
    from common import TEXT
    from transformers import AutoTokenizer

    from compress_export.pipeline.evaluate import cut_windows

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok((TEXT / "eval.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return tok, ids, cut_windows(torch.tensor(ids), WINDOW, WINDOWS)


def llamacpp_rows(model: Path, tag: str, llama_dir: Path, a, with_ppl: bool) -> dict:
    from compress_export.integrations.vllm_offline import _cut
    from compress_export.pipeline.evaluate import summarize

    tok, ids, windows = protocol_ids(model)
    # the prompts vllm_offline.latency times (indices 100 + k), so both engines prefill the same tokens
    prompts = [_cut(ids, a.prompt_tokens, 100 + k) for k in range(a.repeats)]
    decode_prompt = tok(DECODE_PROMPT)["input_ids"]  # as vLLM tokenizes vllm_check's text prompt
    rows = {}
    for kind, path in ggufs(model, tag, llama_dir).items():
        t = time.time()
        r = {"size_mb": round(path.stat().st_size / 1e6, 1), "tensor_types": tensor_types(path, llama_dir)}
        r.update(
            llamacpp(
                {
                    "do": "speed",
                    "gguf": str(path),
                    "prompts": prompts,
                    "decode_prompt": decode_prompt,
                    "tokens": a.tokens,
                }
            )
        )
        if with_ppl:
            import torch

            res = llamacpp({"do": "losses", "gguf": str(path), "windows": windows.tolist()})
            r["ppl"] = round(summarize(tok, windows, torch.tensor(res["losses"])).token_perplexity, 3)
        rows[kind] = r
        print(json.dumps({"engine": "llama.cpp", "model": tag, "run": kind, **r}), f"({time.time() - t:.0f} s)")
    return rows


def vllm_run(model: Path, dtype: str, a, with_ppl: bool, logs: Path, tag: str) -> dict:
    """Prefill from one vLLM engine load (validate's offline runner: time to first token at batch 1) and, with_ppl,
    the protocol's perplexity; decode from vllm_check (vllm_speed.py's helper), a second load."""
    from common import TEXT, vllm_check

    from compress_export.integrations.validate import ValidateOptions, _offline_spec, _run_offline, _Steps

    opts = ValidateOptions(
        max_new_tokens=2,
        windows=WINDOWS if with_ppl else 1,
        latency_lengths=((a.prompt_tokens, 2),),  # its decode figure is not used (see below)
        latency_repeats=a.repeats,
        num_prompts=1,  # offline throughput is not reported here: the smallest run
        input_len=8,
        output_len=2,
        serve=False,
        dtype=dtype,
    )
    spec = _offline_spec(model, opts, TEXT / "eval.txt")
    spec["prompts"] = spec["prompts"][:1]
    res = _run_offline(model, spec, logs, f"{tag}-{dtype}", _Steps(5, tag, enabled=False), timeout=3600)
    if "error" in res:
        return {"dtype": dtype, "error": res["error"][:300]}
    lat = res["latency"][0]
    # decode as vllm_speed.py times it: the latency run's time per output token subtracts two noisy prefills
    dec = vllm_check(model, "--dtype", dtype, "--max-tokens", a.tokens, "--batches", 1, "--repeats", a.repeats)
    if "error" in dec:
        return {"dtype": dtype, "error": dec["error"][-300:]}
    out = {
        "dtype": dtype,
        "prefill_tok_s": round(lat["input_len"] / (lat["ttft_ms"] / 1e3), 2),
        "decode_tok_s": dec["decode_tok_s_by_batch"]["1"],
        "kernels": res.get("kernels"),
    }
    if with_ppl:
        out["vllm_ppl"] = round(res["perplexity"]["token_perplexity"], 3)
    return out


def vllm_rows(model: Path, tag: str, run: str, a, with_ppl: bool, logs: Path) -> dict:
    """Every --dtypes run, the fastest per figure (as vllm_speed.py picks the baseline a user would run)."""
    from common import cli, size_mb

    from compress_export.core.hardware import fast_dtype

    t = time.time()
    runs = []
    dtypes = a.dtypes.split(",")
    ppl_dtype = fast_dtype("cpu") if fast_dtype("cpu") in dtypes else dtypes[0]
    for dt in dtypes:  # vLLM's perplexity once, in the machine's fastest dtype (it hardly depends on it)
        runs.append(vllm_run(model, dt, a, with_ppl and dt == ppl_dtype, logs, f"{tag}-{run}"))
        print(json.dumps({"engine": "vLLM", "model": tag, "run": run, **runs[-1]}), flush=True)
    ok = [r for r in runs if "error" not in r]
    if not ok:
        raise SystemExit(f"every vLLM run of {model} failed: {runs[0]['error']}")
    row = {"size_mb": size_mb(model)}
    for fig in ("prefill_tok_s", "decode_tok_s"):
        best = max(ok, key=lambda r: r[fig])
        row[fig], row[fig + "_dtype"] = best[fig], best["dtype"]
    row["kernels"] = ok[0].get("kernels")
    if with_ppl:
        from common import TEXT

        row["ppl"] = round(cli("eval", model, "--text", TEXT / "eval.txt")["token_perplexity"], 3)
        row["vllm_ppl"] = next((r["vllm_ppl"] for r in ok if "vllm_ppl" in r), None)
    print(f"({time.time() - t:.0f} s)", flush=True)
    return row


# ---------------------------------------------------------------- the run and its tables


class Tee:
    """stdout, also written to the results file (the raw output the benchmarks README cites)."""

    def __init__(self, path: Path):
        self.out, self.file = sys.stdout, open(path, "w", encoding="utf-8")

    def write(self, s):  # flushed at once: a long run's progress lines show as they come
        self.out.write(s)
        self.file.write(s)
        self.flush()

    def flush(self):
        self.out.flush()
        self.file.flush()


def measure_model(name: str, base: Path, export: Path, llama_dir: Path, a, logs: Path) -> dict:
    tag = "smollm2" if name.startswith("SmolLM2") else "1b"
    with_ppl = tag == "smollm2"  # the 1B model is random: its perplexity means nothing
    return {
        "name": name,
        "export": export.name,
        "llama.cpp": llamacpp_rows(base, tag, llama_dir, a, with_ppl),
        "original": vllm_rows(base, tag, "original", a, with_ppl, logs),
        "ours": vllm_rows(export, tag, "export", a, with_ppl, logs),
    }


def _ratio(q, o) -> str:
    return f"{q / o:.2f}×" if q and o else "–"


def tables(rows: list, a) -> None:
    print(
        f"\nBatch 1, {THREADS} threads, greedy; prefill = {a.prompt_tokens}-token prompt / time to first token, "
        f"decode = {a.tokens} new tokens / generation time (vllm_speed.py's way); median of {a.repeats}\n"
    )
    print("| model | engine | run | size MB | prefill tok/s | decode tok/s |\n|---|---|---|---|---|---|")
    for m in rows:
        for kind, r in m["llama.cpp"].items():
            print(
                f"| {m['name']} | llama.cpp | {kind} ({r['tensor_types']}) | {r['size_mb']} | "
                f"{r['prefill_tok_s']} | {r['decode_tok_s']} |"
            )
        for run, label in (("original", "original"), ("ours", f"ours: {m['export']}")):
            r = m[run]
            kern = ", ".join(f"{k} ×{n}" for k, n in (r.get("kernels") or {}).items())
            print(
                f"| {m['name']} | vLLM | {label}{f' ({kern})' if kern else ''} | {r['size_mb']} | "
                f"{r['prefill_tok_s']} ({r['prefill_tok_s_dtype']}) | {r['decode_tok_s']} ({r['decode_tok_s_dtype']}) |"
            )
    print("\nQuantized / original, each engine in the same run:\n")
    print("| model | engine | quantized vs original | prefill | decode |\n|---|---|---|---|---|")
    for m in rows:
        f16, q4 = m["llama.cpp"]["F16"], m["llama.cpp"]["Q4_0"]
        o, e = m["original"], m["ours"]
        for engine, what, qr, orr in (
            ("llama.cpp", "Q4_0 / F16", q4, f16),
            ("vLLM", f"ours ({m['export']}) / original", e, o),
        ):
            cells = [_ratio(qr[f], orr[f]) for f in ("prefill_tok_s", "decode_tok_s")]
            print(f"| {m['name']} | {engine} | {what} | {cells[0]} | {cells[1]} |")
    ppl = [m for m in rows if "ppl" in m["original"]]
    if ppl:
        print(f"\nToken perplexity on eval.txt ({WINDOWS} × {WINDOW}-token windows, no BOS, the shared protocol):\n")
        print("| model | engine | original | quantized | quantized / original |\n|---|---|---|---|---|")
    for m in ppl:
        o, e, f16, q4 = m["original"], m["ours"], m["llama.cpp"]["F16"], m["llama.cpp"]["Q4_0"]
        for engine, orig, quant in (
            (f"ours, our loader (original vs {m['export']})", o["ppl"], e["ppl"]),
            (f"vLLM prompt logprobs (original vs {m['export']})", o.get("vllm_ppl"), e.get("vllm_ppl")),
            ("llama.cpp (F16 vs Q4_0)", f16["ppl"], q4["ppl"]),
        ):
            print(f"| {m['name']} | {engine} | {orig} | {quant} | {_ratio(quant, orig)} |")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":  # inside llama.cpp's venv: no project imports
        return worker(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,1b")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per decode run (vllm_speed.py: 64)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the prefill run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16", help="vLLM dtypes tried; each model in its fastest")
    p.add_argument("--skip-install", action="store_true", help="use the cached llama.cpp venv, never build it")
    p.add_argument("--out", help="raw output file (default benchmarks/results/vs_llamacpp-<cpu kind>.txt)")
    a = p.parse_args()
    from common import ROOT
    from vllm_speed import pairs

    from compress_export.core.hardware import cpu_kind

    kind = cpu_kind()
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"vs_llamacpp-{kind.lower().replace(' ', '-')}.txt")
    llama_dir = ensure_llamacpp(a.skip_install)
    sys.stdout = Tee(out)
    info = llamacpp({"do": "info"})
    print(f"vs_llamacpp: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"{kind} CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print(f"llama-cpp-python {info['version']} (native build): {info['system_info']}")
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        # vllm_speed.py's models and W4 exports (its "gptq" variant: GPTQ W4 g64 / RTN W4 g128)
        for name, base, [(_, export)] in pairs(a.models.split(","), ["gptq"], Path(tmp)):
            rows.append(measure_model(name, base, export, llama_dir, a, Path(tmp)))
    tables(rows, a)
    print(f"\n{time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
