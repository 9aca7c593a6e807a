"""Shared pieces of the hostile-input tests (test_hostile.py: rules 1-3, test_hostile_outputs.py: rules 4-8):
the checks every case makes and the fixtures that build each hostile folder from the tiny random Llama."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import TINY_TEXT, make_tiny_llama  # noqa: F401
from safetensors.torch import load_file, save_file

FAST = ["-q", "--method", "rtn", "--format", "gptq", "--bits", "4", "--group-size", "32"]
UP1 = "model.layers.1.mlp.up_proj.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
CALIB = [
    "-q",
    "--method",
    "gptq",
    "--format",
    "gptq",
    "--bits",
    "4",
    "--group-size",
    "32",
    "--num-samples",
    "4",
    "--seq-len",
    "64",
]  # a calibration the tiny model takes (its context is 256 tokens)
HANG_S = 120  # a refusal takes seconds; this long means the run is blocked on a FIFO


# -- helpers -----------------------------------------------------------------------------------------------------


def assert_refused(rc, err, *needles):
    """Exit 2, one non-empty line on stderr, no internal error or traceback, each needle in that line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert "internal error" not in err and "Traceback" not in err, err
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err!r}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(root) -> dict:
    """{relative path: content hash | 'link -> target' | 'dir' | 'special …'} of everything under root. Links are
    recorded as links (never followed), special files by kind (never opened)."""
    root = Path(root)
    out = {}
    if not os.path.lexists(root):
        return out
    if not root.is_dir() or root.is_symlink():
        return {".": _entry(root)}
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: linked folders are listed, not entered
        dirnames[:] = [d for d in dirnames if d != ".pytest_cache"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = _entry(p)
    return out


def _entry(p: Path) -> str:
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        return "link -> " + os.readlink(p)
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return _sha(p)
    return f"special {stat.S_IFMT(st.st_mode):o}"


def paths_under(root, exclude=()) -> set:
    """Every path under root (links not followed), except those under `exclude` and the pytest cache."""
    root = Path(root)
    ex = [os.path.abspath(e) for e in exclude]
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".pytest_cache"]
        for name in dirnames + filenames:
            p = os.path.abspath(os.path.join(dirpath, name))
            if not any(p == e or p.startswith(e + os.sep) for e in ex):
                out.add(p)
    return out


@contextmanager
def untouched(root: Path, inputs=(), outputs=(), may_remove=()):
    """Around a run: the inputs' trees are unchanged, and under root nothing appeared, changed or disappeared except
    under the named outputs (and the paths in may_remove, which may disappear)."""
    outputs = [os.path.abspath(o) for o in outputs]
    gone_ok = {os.path.abspath(m) for m in may_remove}

    def under_gone_ok(p):
        return any(p == g or p.startswith(g + os.sep) for g in gone_ok)

    before_inputs = {Path(i): tree_hashes(i) for i in inputs}
    before = {p: _entry(Path(p)) for p in paths_under(root, outputs)}
    yield
    for i, h in before_inputs.items():
        now = tree_hashes(i)
        skip = {k for k in h if under_gone_ok(os.path.abspath(Path(i) / k))}
        changed = sorted(k for k in set(h) | set(now) if k not in skip and h.get(k) != now.get(k))
        assert not changed, f"the input {i} changed: {changed}"
    after = {p: _entry(Path(p)) for p in paths_under(root, outputs)}
    new = sorted(set(after) - set(before))
    assert not new, f"written outside the named output: {new}"
    gone = sorted(p for p in set(before) - set(after) if not under_gone_ok(p))
    assert not gone, f"removed outside the named output: {gone}"
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not changed, f"changed outside the named output: {changed}"


def run(capsys, *args):
    """compress_export.cli.main.main in this process: (exit code, stdout, stderr)."""
    from compress_export.cli.main import main

    capsys.readouterr()
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, old)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_subprocess(*args, cwd, timeout=HANG_S):
    """The command in its own process, from a folder outside the repository (its kernels/ would shadow a package);
    a hang fails the test (TimeoutExpired) instead of blocking CI."""
    try:
        r = subprocess.run(
            [sys.executable, "-m", "compress_export.cli.main", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"compress-export {' '.join(map(str, args))} still ran after {timeout} s (blocked?)")
    return r.returncode, r.stdout, r.stderr


@contextmanager
def fifo_watchdog(fifos, seconds=HANG_S):
    """Yields a list that holds True if the run was still going after `seconds`: then the FIFOs are opened for
    writing (and closed) again and again, which unblocks a reader stuck on them, so the test fails instead of
    hanging."""
    done, hung = threading.Event(), []

    def watch():
        if done.wait(seconds):
            return
        hung.append(True)
        while not done.is_set():
            for f in fifos:
                try:
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield hung
    finally:
        done.set()
        t.join()


def no_checkpoint_beside(out: Path, existing=()):
    """No folder beside `out` (nor `out` itself) that holds a config.json: nothing that looks like a checkpoint."""
    assert not os.path.lexists(out), f"{out} exists"
    for d in out.parent.iterdir():
        if d.name in existing:
            continue
        assert not (d.is_dir() and (d / "config.json").exists()), f"{d} looks like a checkpoint"


def rewrite_weights(d: Path, edit) -> None:
    f = d / "model.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f), metadata={"format": "pt"})


def edit_header(f: Path, edit) -> None:
    """Change a safetensors file's JSON header in place (the data bytes stay as they are)."""
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def edit_json(f: Path, edit) -> None:
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d, indent=2))


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("hostile-base") / "tiny-llama", max_pos=256)


@pytest.fixture(scope="session")
def base_export(base_model, tmp_path_factory) -> Path:
    from compress_export.core.scheme import Scheme
    from compress_export.pipeline.compress import compress

    out = tmp_path_factory.mktemp("hostile-export") / "tiny-gptq"
    compress(base_model, out, method="rtn", fmt="gptq", scheme=Scheme(4, 32, True), progress=False)
    return out


@pytest.fixture(autouse=True)
def _work_dir(tmp_path, monkeypatch):
    """Run from an empty folder of this case's own: anything written to the current folder is seen."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")


def _case_copy(base: Path, d: Path) -> Path:
    """A fresh copy of a session-built folder for one case to mutate."""
    d.parent.mkdir()
    shutil.copytree(base, d)
    return d


@pytest.fixture
def src(base_model, tmp_path) -> Path:
    return _case_copy(base_model, tmp_path / "models" / "tiny-llama")


@pytest.fixture
def export(base_export, tmp_path) -> Path:
    return _case_copy(base_export, tmp_path / "exports" / "tiny-gptq")


@pytest.fixture
def text(tmp_path) -> Path:
    p = tmp_path / "text" / "eval.txt"
    p.parent.mkdir()
    p.write_text(TINY_TEXT)
    return p


__all__ = [
    'CALIB',
    'FAST',
    'HANG_S',
    'O0',
    'Q0',
    'TINY_TEXT',
    'UP1',
    '_case_copy',
    '_entry',
    '_sha',
    '_work_dir',
    'assert_refused',
    'base_export',
    'base_model',
    'edit_header',
    'edit_json',
    'export',
    'fifo_watchdog',
    'make_tiny_llama',
    'no_checkpoint_beside',
    'paths_under',
    'rewrite_weights',
    'run',
    'run_subprocess',
    'src',
    'text',
    'tree_hashes',
    'untouched',
]  # the autouse fixture _work_dir too
