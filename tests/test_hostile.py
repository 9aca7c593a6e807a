"""Safe on a model directory someone else wrote: model folders, datasets, recipes and exports are untrusted input.

Each case builds a hostile folder from a copy of the tiny random Llama (conftest.make_tiny_llama) and runs the real
command in-process (compress_export.cli.main), or in a subprocess where a hang must fail the test instead of
blocking CI. Every case also checks that the input tree is unchanged (file hashes; links compared as links, never
followed) and that nothing was written outside the named output (the set of paths under tmp_path).

The rules (the issue):
 1. no foreign code without --trust-remote-code;      5. no silent wrong numbers;
 2. no pickles, ever;                                  6. no hangs, no late OOM;
 3. nothing from outside the folder;                   7. hostile headers and eval/serve inputs are one line;
 4. never damage what the user did not name as output; 8. OS faults are exit 2 with one line, never "internal error".
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_TEXT, make_tiny_llama

FAST = ["-q", "--method", "rtn", "--format", "gptq", "--bits", "4", "--group-size", "32"]
UP1 = "model.layers.1.mlp.up_proj.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
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
    """compress_export.cli.main in this process: (exit code, stdout, stderr)."""
    from compress_export.cli import main

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
        r = subprocess.run([sys.executable, "-m", "compress_export.cli", *map(str, args)], capture_output=True,
                           text=True, cwd=cwd, timeout=timeout)
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


def test_the_fifo_watchdog_unblocks_a_stuck_reader(tmp_path):
    """Control: a read blocked on a FIFO is released by the watchdog and reported as hung."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with fifo_watchdog([fifo], seconds=1) as hung:
        with open(fifo, "rb") as fh:  # blocks until a writer comes
            assert fh.read() == b""
    assert hung == [True]


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
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


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
    from compress_export.pipeline import compress
    from compress_export.scheme import Scheme

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


# -- 1. no foreign code without --trust-remote-code -------------------------------------------------------------

FOREIGN = {"configuration_evil": "EvilConfig", "modeling_evil": "EvilForCausalLM",
           "tokenization_evil": "EvilTokenizer"}


def add_foreign_code(d: Path, markers: Path, *, model_known=True, tokenizer_known=True) -> None:
    """Python files that leave a marker in `markers` when imported, named by config.json's and
    tokenizer_config.json's auto_map; model_known=False: a model_type transformers does not know."""
    markers.mkdir(exist_ok=True)
    for mod, cls in FOREIGN.items():
        (d / f"{mod}.py").write_text(f"import pathlib\npathlib.Path({str(markers / mod)!r}).write_text('ran')\n"
                                     f"class {cls}:\n    pass\n")

    def cfg(c):
        c["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        if not model_known:
            c["model_type"], c["architectures"] = "evil", ["EvilForCausalLM"]

    def tok(c):
        c["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
        if not tokenizer_known:
            c["tokenizer_class"] = "EvilTokenizer"

    edit_json(d / "config.json", cfg)
    edit_json(d / "tokenizer_config.json", tok)


def assert_no_foreign_code_ran(markers: Path):
    ran = sorted(p.name for p in markers.iterdir())
    assert not ran, f"foreign code was imported: {ran}"


def test_the_foreign_code_markers_work(tmp_path):
    """Control: importing the planted files does leave their markers (so an absent marker means never imported)."""
    import importlib.util

    d = tmp_path / "planted"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    add_foreign_code(d, tmp_path / "markers")
    for mod in FOREIGN:
        spec = importlib.util.spec_from_file_location(f"_hostile_{mod}", d / f"{mod}.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == sorted(FOREIGN)


CODE_PATHS = {
    "compress": FAST,
    "calibration-written-by-the-model": ["-q", "--method", "gptq", "--format", "gptq", "--bits", "4",
                                         "--group-size", "32", "--num-samples", "400", "--seq-len", "128"],
    "dataset-self": ["-q", "--method", "gptq", "--format", "gptq", "--bits", "4", "--group-size", "32",
                     "--dataset", "self", "--num-samples", "4", "--seq-len", "16"],
    "no-stream": FAST + ["--no-stream"],
}


def test_calibration_case_really_makes_the_model_write(base_model):
    """The premise of `calibration-written-by-the-model`: the built-in text holds fewer than 400 windows of 128 of
    the tiny model's tokens, so the model itself must write the rest (calibration.from_builtin)."""
    from transformers import AutoTokenizer

    from compress_export.calibration import builtin_text

    tok = AutoTokenizer.from_pretrained(str(base_model))
    assert len(tok(builtin_text(), add_special_tokens=False)["input_ids"]) // 128 < 400


@pytest.mark.parametrize("path", list(CODE_PATHS))
def test_known_model_type_with_auto_map_runs_transformers_code(src, tmp_path, capsys, path):
    """Rule 1: a llama config with an auto_map: transformers' own classes, the folder's code never imported."""
    markers = tmp_path / "markers"
    add_foreign_code(src, markers)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, _, err = run(capsys, *CODE_PATHS[path], src, "-o", out)
    assert_no_foreign_code_ran(markers)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("path", list(CODE_PATHS))
def test_unknown_model_type_needs_trust_remote_code(src, tmp_path, capsys, path):
    """Rule 1: an auto_map whose model_type transformers does not know is refused, naming the flag and the file."""
    markers = tmp_path / "markers"
    add_foreign_code(src, markers, model_known=False)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, _, err = run(capsys, *CODE_PATHS[path], src, "-o", out)
    assert_no_foreign_code_ran(markers)
    assert_refused(rc, err, "--trust-remote-code", "modeling_evil.py")
    assert not out.exists()


def test_unknown_tokenizer_class_needs_trust_remote_code(src, tmp_path, capsys):
    """Rule 1 for the tokenizer: a tokenizer that exists only as the folder's code is refused the same way."""
    markers = tmp_path / "markers"
    add_foreign_code(src, markers, tokenizer_known=False)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert_no_foreign_code_ran(markers)
    assert_refused(rc, err, "--trust-remote-code", "tokenization_evil.py")
    assert not out.exists()


@pytest.mark.parametrize("known", [True, False], ids=["llama", "unknown-type"])
def test_eval_never_runs_foreign_code(src, tmp_path, capsys, text, known):
    """Rule 1 through eval of a model folder: runs with transformers' code, or is refused in one line."""
    markers = tmp_path / "markers"
    add_foreign_code(src, markers, model_known=known)
    with untouched(tmp_path, inputs=[src, text]):
        rc, out, err = run(capsys, "eval", src, "--text", text, "--windows", "1", "--window", "16")
    assert_no_foreign_code_ran(markers)
    if known:
        assert rc == 0 and "token ppl" in out, err
    else:
        assert_refused(rc, err, "--trust-remote-code", "modeling_evil.py")


def test_eval_of_an_export_carrying_foreign_code(src, tmp_path, capsys, text):
    """Rule 1: the export of a folder with an auto_map carries it (and the .py files) along; eval of that export
    still never imports them."""
    markers = tmp_path / "markers"
    add_foreign_code(src, markers)
    out = tmp_path / "out"
    rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert rc == 0, err
    with untouched(tmp_path, inputs=[src, out, text]):
        rc, so, err = run(capsys, "eval", out, "--text", text, "--windows", "1", "--window", "16")
    assert_no_foreign_code_ran(markers)
    assert rc == 0 and "token ppl" in so, err


@pytest.mark.parametrize("known", [True, False], ids=["llama", "unknown-type"])
def test_from_pretrained_export_never_runs_foreign_code(src, tmp_path, known):
    """Rule 1 through AutoCompressedModelForCausalLM.from_pretrained(export=True)."""
    from compress_export import AutoCompressedModelForCausalLM, CompressionConfig
    from compress_export.errors import UserError

    markers = tmp_path / "markers"
    add_foreign_code(src, markers, model_known=known)
    out = tmp_path / "out"
    qc = CompressionConfig(method="rtn", format="gptq", bits=4, group_size=32)
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        if known:
            model = AutoCompressedModelForCausalLM.from_pretrained(src, export=True, quantization_config=qc,
                                                                   output_dir=str(out), progress=False,
                                                                   dtype=torch.float32)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
            assert torch.isfinite(logits).all()
            assert type(model).__name__ == "LlamaForCausalLM"
        else:
            with pytest.raises(UserError) as e:
                AutoCompressedModelForCausalLM.from_pretrained(src, export=True, quantization_config=qc,
                                                               output_dir=str(out), progress=False)
            assert "trust" in str(e.value) and "modeling_evil.py" in str(e.value)
            assert not out.exists()
    assert_no_foreign_code_ran(markers)


# -- 2. no pickles, ever -----------------------------------------------------------------------------------------

class _Boom:
    """Unpickling this makes a folder (the marker): the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": _Boom(marker)})


def test_the_pickle_marker_works(tmp_path):
    """Control: loading the planted pickle does make its marker."""
    marker = tmp_path / "unpickled"
    pickle.loads(evil_pickle(marker))
    assert marker.is_dir()


@pytest.mark.parametrize("verb", ["compress", "eval", "convert", "check"])
def test_pickle_only_folder_is_refused(src, tmp_path, capsys, text, verb):
    """Rule 2: weights only as a pickle: refused, the pickle never loaded."""
    marker = tmp_path / "markers" / "unpickled"
    marker.parent.mkdir()
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    args = {"compress": [*FAST, src, "-o", tmp_path / "out"], "eval": ["eval", src, "--text", text],
            "convert": ["convert", src, "--format", "awq", "-o", tmp_path / "out"], "check": ["check", src]}[verb]
    with untouched(tmp_path, inputs=[src], outputs=[tmp_path / "out"]):
        rc, _, err = run(capsys, *args)
    assert not marker.exists()
    assert_refused(rc, err, "pickle", "never loaded")
    assert not (tmp_path / "out").exists()


def test_pickles_beside_safetensors_are_never_loaded_nor_copied(src, tmp_path, capsys, text):
    """Rule 2: .bin / .pt files beside the safetensors are ignored: never loaded, never in the export."""
    marker = tmp_path / "markers" / "unpickled"
    marker.parent.mkdir()
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"):
        (src / name).write_bytes(evil_pickle(marker))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
        assert rc == 0, err
        rc, so, err = run(capsys, "eval", src, "--text", text, "--windows", "1", "--window", "16")
        assert rc == 0 and "token ppl" in so, err
    assert not marker.exists()
    pickles = [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not pickles, pickles


def test_pickles_beside_an_export_are_never_loaded_nor_copied_by_convert(export, tmp_path, capsys, text):
    """Rule 2 for convert and eval of an export: a pickle beside it is neither loaded nor carried into the copy."""
    marker = tmp_path / "markers" / "unpickled"
    marker.parent.mkdir()
    (export / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    (export / "extra.pt").write_bytes(evil_pickle(marker))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[export], outputs=[out]):
        rc, _, err = run(capsys, "convert", export, "--format", "awq", "-o", out)
        assert rc == 0, err
        rc, so, err = run(capsys, "eval", export, "--text", text, "--windows", "1", "--window", "16")
        assert rc == 0 and "token ppl" in so, err
    assert not marker.exists()
    pickles = [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not pickles, pickles


# -- 3. nothing from outside the folder --------------------------------------------------------------------------

LINKED = ["tokenizer.json", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json"]


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "elsewhere" / "secret.txt"
    p.parent.mkdir()
    p.write_text("SECRET-7c1e0f9b2d- do not leak\n")
    return p


def link_outside(d: Path, name: str, target: Path) -> None:
    if os.path.lexists(d / name):
        (d / name).unlink()
    os.symlink(target, d / name)


def assert_nothing_leaked(secret: Path, *outputs):
    raw = secret.read_text().strip()
    for o in outputs:
        assert raw not in o and "SECRET-7c1e0f9b2d" not in o


@pytest.mark.parametrize("target", ["secret", "environ"])
@pytest.mark.parametrize("name", LINKED)
def test_link_to_a_file_outside_the_model_folder(src, tmp_path, capsys, secret, name, target):
    """Rule 3: a file of the model folder that links outside it is refused, naming the file, before it is read."""
    link_outside(src, name, secret if target == "secret" else Path("/proc/self/environ"))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, so, err = run(capsys, *FAST, src, "-o", out)
    assert_refused(rc, err, name, "outside")
    assert_nothing_leaked(secret, so, err)
    assert "PATH=" not in so + err and "\x00" not in so + err  # nothing of /proc/self/environ either
    assert not out.exists()


@pytest.mark.parametrize("verb", ["eval", "convert", "check"])
def test_export_with_a_link_outside_it(export, tmp_path, capsys, secret, text, verb):
    """Rule 3 for the verbs that read an export: its tokenizer.json linking outside it is refused."""
    link_outside(export, "tokenizer.json", secret)
    out = tmp_path / "out"
    args = {"eval": ["eval", export, "--text", text], "convert": ["convert", export, "--format", "awq", "-o", out],
            "check": ["check", export]}[verb]
    with untouched(tmp_path, inputs=[export], outputs=[out]):
        rc, so, err = run(capsys, *args)
    assert_refused(rc, err, "tokenizer.json", "outside")
    assert_nothing_leaked(secret, so, err)
    assert not out.exists()


@pytest.mark.parametrize("verb", ["eval", "convert", "check"])
def test_fifo_beside_an_export_is_never_opened(export, tmp_path, capsys, text, verb):
    """Rule 3: a FIFO named pytorch_model.bin beside an export: refused as not a regular file, without blocking."""
    fifo = export / "pytorch_model.bin"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    args = {"eval": ["eval", export, "--text", text], "convert": ["convert", export, "--format", "awq", "-o", out],
            "check": ["check", export]}[verb]
    with untouched(tmp_path, inputs=[export], outputs=[out]):
        with fifo_watchdog([fifo]) as hung:
            rc, _, err = run(capsys, *args)
    assert not hung, f"blocked on the FIFO for {HANG_S} s"
    assert_refused(rc, err, "not a regular file")
    assert not out.exists()


@pytest.mark.parametrize("where", ["README.md", "tokenizer.json", "sub/notes.txt"])
def test_fifo_in_a_model_folder_is_never_opened(src, tmp_path, capsys, where):
    """Rule 3: a FIFO anywhere in the model folder (at the top, in place of a file that is read, in a subfolder)."""
    fifo = src / where
    fifo.parent.mkdir(exist_ok=True)
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        with fifo_watchdog([fifo]) as hung:
            rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert not hung, f"blocked on the FIFO for {HANG_S} s"
    assert_refused(rc, err, "not a regular file")
    assert not out.exists()


def test_fifo_in_a_model_folder_through_the_command(src, tmp_path):
    """Rule 3 in a real process: a FIFO named pytorch_model.bin in the model folder never blocks the command."""
    os.mkfifo(src / "pytorch_model.bin")
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, _, err = run_subprocess(*FAST, src, "-o", out, cwd=tmp_path / "work")
    assert_refused(rc, err, "pytorch_model.bin", "not a regular file")
    assert not out.exists()


def test_datasets_folder_with_a_link_outside_it(src, tmp_path, capsys, secret):
    """Rule 3 for --dataset: a `datasets` folder whose data file links outside it is refused before it is read."""
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset_info.json").write_text("{}")
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    os.symlink(secret, ds / "data-00000-of-00001.arrow")
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src, ds], outputs=[out]):
        rc, so, err = run(capsys, *CALIB, "--dataset", ds, src, "-o", out)
    assert_refused(rc, err, "data-00000-of-00001.arrow", "outside")
    assert_nothing_leaked(secret, so, err)
    assert not out.exists()


def make_hub_snapshot(model: Path, hub: Path) -> Path:
    """The Hugging Face hub cache layout: models--org--name/snapshots/REV/<file> -> ../../blobs/<sha256>."""
    repo = hub / "models--org--tiny-llama"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123456789abcdef"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    for f in sorted(model.iterdir()):
        sha = _sha(f)
        shutil.move(str(f), blobs / sha)
        os.symlink(f"../../blobs/{sha}", snap / f.name)
    return snap


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "no-stream"])
def test_hub_cache_snapshot_compresses_and_the_export_has_no_links(src, tmp_path, capsys, stream):
    """Rule 3 must not break the hub cache: its snapshot links into its own blobs/; the export holds copies."""
    snap = make_hub_snapshot(src, tmp_path / "hub")
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[tmp_path / "hub"], outputs=[out]):
        rc, _, err = run(capsys, *FAST, *([] if stream else ["--no-stream"]), snap, "-o", out)
    assert rc == 0, err
    links = [os.path.join(d, n) for d, ds, fs in os.walk(out) for n in ds + fs if os.path.islink(os.path.join(d, n))]
    assert not links, links
    assert _sha(out / "tokenizer.json") == _sha(snap / "tokenizer.json")  # copied by content


def test_hub_snapshot_linking_into_another_repository_is_refused(base_model, tmp_path, capsys, secret):
    """Rule 3: inside a hub cache, a snapshot file may link into its own repository's blobs only."""
    a = tmp_path / "a"
    shutil.copytree(base_model, a)
    snap = make_hub_snapshot(a, tmp_path / "hub")
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(secret, other / "deadbeef")
    link_outside(snap, "tokenizer.json", Path("../../../models--org--other/blobs/deadbeef"))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[tmp_path / "hub"], outputs=[out]):
        rc, so, err = run(capsys, *FAST, snap, "-o", out)
    assert_refused(rc, err, "tokenizer.json", "outside")
    assert_nothing_leaked(secret, so, err)
    assert not out.exists()


# -- 4. never damage what the user did not name as output --------------------------------------------------------

TARGETS = ["same", "parent", "inside", "home", "cwd", "root"]


def _target(kind, src: Path, tmp_path: Path, monkeypatch) -> str:
    if kind == "same":
        return str(src)
    if kind == "parent":
        return str(src.parent)
    if kind == "inside":
        return str(src / "sub")
    if kind == "home":
        home = tmp_path / "home"
        home.mkdir()
        (home / "thesis.tex").write_text("years of work\n")
        monkeypatch.setenv("HOME", str(home))
        return str(home)
    if kind == "cwd":
        (tmp_path / "work" / "todo.txt").write_text("milk\n")
        return "."
    return "/"


@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("verb", ["compress", "convert"])
def test_output_that_would_damage_something_is_refused(src, export, tmp_path, capsys, monkeypatch, verb, kind):
    """Rule 4: -o the source itself, its parent, inside it, $HOME, the current folder or / (all with
    --overwrite): refused, nothing changed anywhere."""
    source = src if verb == "compress" else export
    target = _target(kind, source, tmp_path, monkeypatch)
    args = [*FAST, source] if verb == "compress" else ["convert", source, "--format", "awq"]
    root_before = sorted(os.listdir("/"))
    with untouched(tmp_path, inputs=[source]):
        rc, _, err = run(capsys, *args, "-o", target, "--overwrite")
    assert_refused(rc, err)
    assert sorted(os.listdir("/")) == root_before


@pytest.mark.parametrize("verb", ["compress", "convert"])
@pytest.mark.parametrize("kind", ["user-files", "someone-elses-model"])
def test_overwrite_refuses_a_folder_compress_export_did_not_write(src, export, base_model, tmp_path, capsys, verb,
                                                                  kind):
    """Rule 4: --overwrite replaces only our own outputs; the refusal names us and lists what is there."""
    mine = tmp_path / "mine"
    if kind == "user-files":
        mine.mkdir()
        (mine / "notes.txt").write_text("mine\n")
        (mine / "photo.jpg").write_bytes(b"\xff\xd8\xff")
        listed = "notes.txt"
    else:
        shutil.copytree(base_model, mine)  # a model folder with a config.json, not an export of ours
        listed = "config.json"
    args = [*FAST, src] if verb == "compress" else ["convert", export, "--format", "awq"]
    with untouched(tmp_path, inputs=[src, export, mine]):
        rc, _, err = run(capsys, *args, "-o", mine, "--overwrite")
    assert_refused(rc, err, "compress-export", listed)


@pytest.mark.parametrize("verb", ["compress", "convert"])
def test_overwrite_replaces_a_previous_export_of_ours(src, export, tmp_path, capsys, verb):
    """Rule 4: --overwrite on a folder we wrote works (and leaves no old or partial folder behind)."""
    out = tmp_path / "out"
    args = [*FAST, src] if verb == "compress" else ["convert", export, "--format", "awq"]
    rc, _, err = run(capsys, *args, "-o", out)
    assert rc == 0, err
    first = (out / "config.json").read_text()
    with untouched(tmp_path, inputs=[src, export], outputs=[out]):
        rc, _, err = run(capsys, *args, "-o", out, "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text()) == json.loads(first)


def test_overwrite_through_a_link_to_a_user_folder_is_refused(src, tmp_path, capsys):
    """Rule 4: -o names a link to a folder of the user's (not ours): --overwrite replaces neither."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    os.symlink(mine, tmp_path / "out")
    with untouched(tmp_path, inputs=[src, mine]):
        rc, _, err = run(capsys, *FAST, src, "-o", tmp_path / "out", "--overwrite")
    assert_refused(rc, err)
    assert (tmp_path / "out").is_symlink()


def test_from_pretrained_export_into_the_source_is_refused(src, tmp_path):
    """Rule 4 through the Python API: export=True with output_dir the model folder itself."""
    from compress_export import AutoCompressedModelForCausalLM, CompressionConfig
    from compress_export.errors import UserError

    qc = CompressionConfig(method="rtn", format="gptq", bits=4, group_size=32)
    with untouched(tmp_path, inputs=[src]):
        with pytest.raises(UserError):
            AutoCompressedModelForCausalLM.from_pretrained(src, export=True, quantization_config=qc,
                                                           output_dir=str(src), progress=False)


def test_save_recipe_over_a_file_we_did_not_write_is_refused(src, tmp_path, capsys):
    """Rule 4: --save-recipe --overwrite onto an existing file that is not a recipe of ours: refused, unchanged."""
    notes = tmp_path / "work" / "notes.json"
    notes.write_text('{"my": "settings"}\n')
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src, notes]):
        rc, _, err = run(capsys, *FAST, src, "-o", out, "--save-recipe", notes, "--overwrite")
    assert_refused(rc, err, "--save-recipe")
    assert not out.exists()


def test_save_recipe_into_the_source_is_refused(src, tmp_path, capsys):
    """Rule 4: --save-recipe MODEL_DIR/config.json would overwrite the model's config: refused, unchanged."""
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, *FAST, src, "-o", out, "--save-recipe", src / "config.json", "--overwrite")
    assert_refused(rc, err, "--save-recipe")
    assert not out.exists()


def test_save_recipe_is_not_written_by_a_failed_run(src, tmp_path, capsys):
    """Rule 4: a run that fails (a group size that does not divide) leaves no recipe."""
    out, recipe = tmp_path / "out", tmp_path / "work" / "R.json"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, "-q", "--method", "rtn", "--group-size", "48", src, "-o", out,
                         "--save-recipe", recipe)
    assert_refused(rc, err, "--group-size 48")
    assert not recipe.exists() and not out.exists()


def test_save_recipe_is_written_by_a_successful_run(src, tmp_path, capsys):
    from compress_export.config import CompressionConfig

    out, recipe = tmp_path / "out", tmp_path / "work" / "R.json"
    with untouched(tmp_path, inputs=[src], outputs=[out, recipe]):
        rc, _, err = run(capsys, *FAST, src, "-o", out, "--save-recipe", recipe)
    assert rc == 0, err
    r = CompressionConfig.load(recipe)
    assert (r.method, r.format, r.bits, r.group_size) == ("rtn", "gptq", 4, 32)


def _dead_pid() -> int:
    for pid in (999999, 4194303, 3999999):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


def test_stale_partial_sweep_removes_only_what_is_provably_ours(src, tmp_path, capsys):
    """Rule 4: beside OUT, only a partial folder whose owner mark names a dead process of this host is removed; a
    user's folders that merely look like ours (no mark, a mark of another host or of a live process, a link to a
    marked folder) survive, however old."""
    out = tmp_path / "out"
    hour_ago = time.time() - 3600
    user = []
    for name in (".out.partial-abc", ".out.old-1"):
        d = tmp_path / name
        d.mkdir()
        (d / "mine.txt").write_text("not yours\n")
        os.utime(d / "mine.txt", (hour_ago, hour_ago))
        os.utime(d, (hour_ago, hour_ago))
        user.append(d)
    dead = _dead_pid()
    host = socket.gethostname()
    other_host = tmp_path / ".out.partial-otherhost"
    other_host.mkdir()
    (other_host / ".compress-export-owner").write_text(f"{dead} not-{host}\n")
    live = tmp_path / ".out.partial-live"
    live.mkdir()
    (live / ".compress-export-owner").write_text(f"{os.getpid()} {host}\n")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / ".compress-export-owner").write_text(f"{dead} {host}\n")
    (precious / "data.txt").write_text("keep\n")
    os.symlink(precious, tmp_path / ".out.partial-link")
    stale = tmp_path / ".out.partial-xyz"
    stale.mkdir()
    (stale / ".compress-export-owner").write_text(f"{dead} {host}\n")
    (stale / "part-00001.spill2").write_bytes(b"\0" * 64)
    with untouched(tmp_path, inputs=[src, *user, other_host, live, precious], outputs=[out], may_remove=[stale]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert rc == 0, err
    assert not stale.exists()
    assert all(d.is_dir() for d in user) and other_host.is_dir() and live.is_dir() and precious.is_dir()
    assert (tmp_path / ".out.partial-link").is_symlink()


# -- 5. no silent wrong numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_integer_source_dtype_is_refused(src, tmp_path, capsys, key):
    edit_json(src / "config.json", lambda c: c.update({key: "int8"}))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert_refused(rc, err, key, "int8")


STREAM = {"streamed": [], "no-stream": ["--no-stream"]}


@pytest.mark.parametrize("mode", list(STREAM))
def test_missing_decoder_weight_is_named(src, tmp_path, capsys, mode):
    rewrite_weights(src, lambda t: t.pop(UP1))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, *FAST, *STREAM[mode], src, "-o", out)
    assert_refused(rc, err, UP1)


def test_missing_decoder_weight_through_the_python_api(src, tmp_path):
    import compress_export
    from compress_export.errors import UserError
    from compress_export.scheme import Scheme

    rewrite_weights(src, lambda t: t.pop(UP1))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        with pytest.raises(UserError) as e:
            compress_export.compress(src, out, method="rtn", fmt="gptq", scheme=Scheme(4, 32, True), progress=False)
    assert UP1 in str(e.value)


@pytest.mark.parametrize("mode", list(STREAM))
def test_tensor_with_the_wrong_shape_is_named(src, tmp_path, capsys, mode):
    rewrite_weights(src, lambda t: t.update({UP1: t[UP1][:-1].contiguous()}))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, *FAST, *STREAM[mode], src, "-o", out)
    assert_refused(rc, err, UP1)


def test_tensor_in_two_shards_is_named(src, tmp_path, capsys):
    t = load_file(str(src / "model.safetensors"))
    names = sorted(t)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    dup = next(n for n in first if "layers" in n)
    (src / "model.safetensors").unlink()
    save_file({n: t[n] for n in first}, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({n: t[n] for n in second + [dup]}, str(src / "model-00002-of-00002.safetensors"),
              metadata={"format": "pt"})
    wmap = {n: "model-00001-of-00002.safetensors" for n in first}
    wmap.update({n: "model-00002-of-00002.safetensors" for n in second})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert_refused(rc, err, dup)


@pytest.mark.parametrize("mode", list(STREAM))
def test_nan_in_a_source_weight_is_refused(src, tmp_path, capsys, mode):
    def poison(t):
        t[Q0][3, 5] = float("nan")

    rewrite_weights(src, poison)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, *FAST, *STREAM[mode], src, "-o", out)
    assert_refused(rc, err, "NaN")
    no_checkpoint_beside(out, existing={"models", "work"})


def test_eval_of_an_export_with_a_nan_scale_fails(export, tmp_path, capsys, text):
    def poison(t):
        t["model.layers.0.self_attn.q_proj.scales"][0, 0] = float("nan")

    rewrite_weights(export, poison)
    with untouched(tmp_path, inputs=[export]):
        rc, so, err = run(capsys, "eval", export, "--text", text, "--windows", "1", "--window", "16")
    assert rc != 0, so
    assert "internal error" not in err and "Traceback" not in err, err


def test_convert_of_an_export_missing_a_qweight(export, tmp_path, capsys):
    rewrite_weights(export, lambda t: t.pop("model.layers.1.mlp.up_proj.qweight"))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[export]):
        rc, _, err = run(capsys, "convert", export, "--format", "awq", "-o", out)
    assert_refused(rc, err, "model.layers.1.mlp.up_proj")


def test_convert_of_an_export_with_a_wrong_hidden_size(export, tmp_path, capsys):
    edit_json(export / "config.json", lambda c: c.update({"hidden_size": 128}))
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[export]):
        rc, _, err = run(capsys, "convert", export, "--format", "awq", "-o", out)
    assert_refused(rc, err)


# -- 6. no hangs, no late OOM ------------------------------------------------------------------------------------

CALIB = ["-q", "--method", "gptq", "--format", "gptq", "--bits", "4", "--group-size", "32", "--num-samples", "4",
         "--seq-len", "64"]  # a calibration the tiny model takes (its context is 256 tokens)

@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_dataset_that_never_ends_is_refused_through_the_command(src, tmp_path, kind):
    """Rule 6 in a real process: a --dataset that is a FIFO (blocks) or a device (never ends)."""
    if kind == "fifo":
        ds = tmp_path / "calib.txt"
        os.mkfifo(ds)
    else:
        ds = Path(kind)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, _, err = run_subprocess(*CALIB, "--dataset", ds, src, "-o", out, cwd=tmp_path / "work")
    assert_refused(rc, err, "--dataset", "regular file")
    assert not out.exists()


def test_dataset_fifo_in_process(src, tmp_path, capsys):
    ds = tmp_path / "calib.txt"
    os.mkfifo(ds)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        with fifo_watchdog([ds]) as hung:
            rc, _, err = run(capsys, *CALIB, "--dataset", ds, src, "-o", out)
    assert not hung, f"blocked on the FIFO for {HANG_S} s"
    assert_refused(rc, err, "--dataset", "regular file")


def test_recipe_fifo_in_process(src, tmp_path, capsys):
    """Rule 6: --recipe naming a FIFO is refused without blocking."""
    recipe = tmp_path / "recipe.json"
    os.mkfifo(recipe)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        with fifo_watchdog([recipe]) as hung:
            rc, _, err = run(capsys, *FAST, "--recipe", recipe, src, "-o", out)
    assert not hung, f"blocked on the FIFO for {HANG_S} s"
    assert_refused(rc, err, "--recipe", "regular file")
    assert not out.exists()


def test_eval_text_fifo_in_process(export, tmp_path, capsys):
    """Rule 6: eval --text naming a FIFO is refused without blocking."""
    fifo = tmp_path / "eval.txt"
    os.mkfifo(fifo)
    with untouched(tmp_path, inputs=[export]):
        with fifo_watchdog([fifo]) as hung:
            rc, _, err = run(capsys, "eval", export, "--text", fifo)
    assert not hung, f"blocked on the FIFO for {HANG_S} s"
    assert_refused(rc, err, "--text")


def test_seq_len_beyond_the_context_is_refused_at_once(src, tmp_path, capsys):
    out = tmp_path / "out"
    t = time.time()
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, "-q", "--method", "gptq", "--group-size", "32", "--seq-len", "200000", src,
                         "-o", out)
    assert time.time() - t < 30
    assert_refused(rc, err, "--seq-len", "max_position_embeddings")


# -- 7. hostile headers; eval and serve inputs -------------------------------------------------------------------

def _overlap(h):
    h[O0]["data_offsets"] = list(h[Q0]["data_offsets"])  # same size, same bytes


def _negative(h):
    h[Q0]["shape"] = [-64, 64]


def _f8(h):
    h[Q0]["dtype"], h[Q0]["shape"] = "F8_E4M3", [128, 64]  # the same bytes, read as one-byte floats


HEADERS = {"overlapping-offsets": (_overlap, ()), "negative-shape": (_negative, ()),
           "f8": (_f8, ("unsupported dtype F8_E4M3 in tensor",))}


@pytest.mark.parametrize("kind", list(HEADERS))
def test_hostile_safetensors_header(src, tmp_path, capsys, kind):
    edit, needles = HEADERS[kind]
    edit_header(src / "model.safetensors", edit)
    out = tmp_path / "out"
    with untouched(tmp_path, inputs=[src]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert_refused(rc, err, "model.safetensors", *needles)


def test_eval_window_zero(export, tmp_path, capsys, text):
    with untouched(tmp_path, inputs=[export, text]):
        rc, _, err = run(capsys, "eval", export, "--text", text, "--window", "0")
    assert_refused(rc, err, "--window")


def test_eval_of_an_empty_text(export, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with untouched(tmp_path, inputs=[export, empty]):
        rc, _, err = run(capsys, "eval", export, "--text", empty)
    assert_refused(rc, err, "--text")


def test_serve_without_vllm_is_one_line(export, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as when it is not installed
    saved_env, saved_argv = dict(os.environ), list(sys.argv)
    try:
        with untouched(tmp_path, inputs=[export]):
            rc, _, err = run(capsys, "serve", export)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:] = saved_argv
    assert_refused(rc, err)
    assert "vllm" in err.lower(), err  # it names what is missing


# -- 8. OS faults are exit 2 and one line, never "internal error" ------------------------------------------------

def _raise(e):
    def f(*a, **k):
        raise e
    return f


def _faults():
    from compress_export import writer

    return {
        "ENOSPC-closing-a-shard": (writer._Shard, "close",
                                   OSError(errno.ENOSPC, "No space left on device", "part-00001.safetensors")),
        "EPERM-making-the-partial-folder": (writer.tempfile, "mkdtemp",
                                            PermissionError(errno.EPERM, "Operation not permitted", "out")),
        "EACCES-making-the-partial-folder": (writer.tempfile, "mkdtemp",
                                             PermissionError(errno.EACCES, "Permission denied", "out")),
        "EROFS-making-the-partial-folder": (writer.tempfile, "mkdtemp",
                                            OSError(errno.EROFS, "Read-only file system", "out")),
        "EMFILE-adding-a-tensor": (writer._Shard, "add", OSError(errno.EMFILE, "Too many open files")),
    }


FAULTS = ["ENOSPC-closing-a-shard", "EPERM-making-the-partial-folder", "EACCES-making-the-partial-folder",
          "EROFS-making-the-partial-folder", "EMFILE-adding-a-tensor"]


@pytest.mark.parametrize("fault", FAULTS)
def test_os_fault_is_one_line_and_leaves_no_checkpoint(src, tmp_path, capsys, monkeypatch, fault):
    owner, attr, exc = _faults()[fault]
    monkeypatch.setattr(owner, attr, _raise(exc))
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "o"
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert_refused(rc, err)
    no_checkpoint_beside(out)


@pytest.mark.parametrize("mode", list(STREAM))
def test_source_shard_deleted_after_preflight(src, tmp_path, capsys, monkeypatch, mode):
    from compress_export import pipeline

    real = pipeline.open_source

    def vanish_then_open(*a, **k):
        (src / "model.safetensors").unlink()
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "open_source", vanish_then_open)
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "o"
    with untouched(tmp_path, inputs=[src], outputs=[out], may_remove=[src / "model.safetensors"]):
        rc, _, err = run(capsys, *FAST, *STREAM[mode], src, "-o", out)
    assert_refused(rc, err)
    no_checkpoint_beside(out)


def test_source_shard_deleted_between_layers(src, tmp_path, capsys, monkeypatch):
    """Rule 8: the shard disappears after the first decoder layer was read (streamed: it is reopened per layer)."""
    from compress_export.source import StreamedSource

    real = StreamedSource.release_layer

    def release_then_vanish(self, layout, i):
        real(self, layout, i)
        if (src / "model.safetensors").exists():
            (src / "model.safetensors").unlink()

    monkeypatch.setattr(StreamedSource, "release_layer", release_then_vanish)
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "o"
    with untouched(tmp_path, inputs=[src], outputs=[out], may_remove=[src / "model.safetensors"]):
        rc, _, err = run(capsys, *FAST, src, "-o", out)
    assert not (src / "model.safetensors").exists()  # the premise: the run did stream, and lost its shard
    assert_refused(rc, err)
    no_checkpoint_beside(out)
