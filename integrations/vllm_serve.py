"""`vllm serve` on 127.0.0.1 for one model: start on a free port, wait until healthy, smoke-test the OpenAI
endpoints, load it with vLLM's own serving benchmark, stop by PID.

The server runs through `compress-export serve` (the platform's working defaults, our plugin) in its own process
session, so stopping it stops the API server, engine core and workers together, also when the caller fails.
The load comes from `vllm bench serve`'s machinery (`vllm.benchmarks.serve`), run in a client subprocess:
random prompts of fixed length, a concurrency cap, TTFT/TPOT/end-to-end percentiles as vLLM defines them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from compress_export.integrations.vllm_check import read_result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Server:
    """`with Server(model_dir, log) as s:` serves on s.base_url (…/v1) under the model name s.name."""

    def __init__(
        self, model_dir, log_path, name: str = "model", max_model_len: int = 1024, extra=(), start_timeout: float = 900
    ):
        self.model_dir, self.log_path, self.name = str(model_dir), Path(log_path), name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.cmd = [
            sys.executable,
            "-m",
            "compress_export.cli.main",
            "serve",
            self.model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(max_model_len),
            "--served-model-name",
            name,
            *extra,
        ]
        self.start_timeout = start_timeout
        self.proc = None
        self.start_s = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self):
        self._log = open(self.log_path, "w")
        t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_s = round(time.time() - t0, 2)
        return self

    def _wait_healthy(self) -> None:
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        raise RuntimeError(f"vllm serve was not healthy after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (a server shuts down cleanly on it), SIGKILL if it lingers."""
        try:
            if self.proc is not None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        finally:
            self.proc = None
            self._log.close()

    def __exit__(self, *exc):
        self.stop()


def smoke(base_url: str, name: str, chat: bool, prompt: str = "The capital of France is") -> dict:
    """One greedy request to /v1/completions and, when the export keeps a chat template, /v1/chat/completions."""
    out = {}
    r = post(base_url + "/completions", {"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    out["completions"] = r["choices"][0]["text"]
    if chat:
        r = post(
            base_url + "/chat/completions",
            {
                "model": name,
                "max_tokens": 24,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        out["chat_completions"] = r["choices"][0]["message"]["content"]
    return out


def bench_args(
    model_dir: str,
    name: str,
    port: int,
    input_len: int,
    output_len: int,
    num_prompts: int,
    concurrency: int,
    seed: int = 0,
    ignore_eos: bool = False,
) -> list:
    """`vllm bench serve` flags for one load point. Points with different seeds get different random prompts
    (no prefix-cache hits between them); ignore_eos makes every answer output_len tokens long."""
    return [
        "--backend",
        "openai",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        name,
        "--served-model-name",
        name,
        "--tokenizer",
        model_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,e2el",
        "--metric-percentiles",
        "50,90,95,99",
        "--disable-tqdm",
    ] + (["--ignore-eos"] if ignore_eos else [])


KEEP = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "total_input_tokens",
    "total_output_tokens",
) + tuple(f"{s}_{m}_ms" for m in ("ttft", "tpot", "e2el") for s in ("mean", "p50", "p90", "p95", "p99"))


def run_bench(points: list) -> list:
    """In this process: each point is a `vllm bench serve` argument list; the summary numbers of each, or
    {"error": ...} for a point whose client failed (the points after it still run)."""
    import argparse

    from compress_export.integrations.vllm_launch import cpu_environment

    os.environ.update(cpu_environment())  # importing vLLM picks its platform: without this, SIGILL on AVX2
    from compress_export.integrations.vllm_api import get

    add_cli_args, main = get("bench_serve_add_cli_args"), get("bench_serve_main")

    results = []
    for argv in points:
        p = argparse.ArgumentParser()
        add_cli_args(p)
        try:
            res = main(p.parse_args(argv))
        except Exception as e:  # one point's failure is that point's figure, not the sweep's end
            results.append({"error": f"{type(e).__name__}: {str(e)[-1000:]}"})
            continue
        results.append({k: res[k] for k in KEEP if k in res})
    return results


def bench(points: list, log_path, timeout: float = 1800) -> list:
    """`run_bench` in a client subprocess (vLLM's benchmark imports the whole of vLLM; a failure stays there)."""
    code = (
        "import json, sys\nfrom compress_export.integrations.vllm_serve import run_bench\n"
        "print('RESULT ' + json.dumps(run_bench(json.loads(sys.argv[1]))), flush=True)\n"
    )
    with open(log_path, "w") as log:
        r = subprocess.run(
            [sys.executable, "-c", code, json.dumps(points)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=timeout,
        )
    res = read_result(r.stdout)
    if r.returncode or res is None:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vllm bench serve failed (exit {r.returncode}):\n{tail}")
    return res
