"""Safe on a model directory someone else wrote: model folders, datasets, recipes and exports are untrusted input.

Each case builds a hostile folder from a copy of the tiny random Llama (conftest.make_tiny_llama) and runs the real
command in-process (compress_export.cli.main.main), or in a subprocess where a hang must fail the test instead of
blocking CI. Every case also checks that the input tree is unchanged (file hashes; links compared as links, never
followed) and that nothing was written outside the named output (the set of paths under tmp_path).

The rules (the issue):
 1. no foreign code without --trust-remote-code;      5. no silent wrong numbers;
 2. no pickles, ever;                                  6. no hangs, no late OOM;
 3. nothing from outside the folder;                   7. hostile headers and eval/serve inputs are one line;
 4. never damage what the user did not name as output; 8. OS faults are exit 2 with one line, never "internal error".
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hostile import *  # noqa: F401,F403  (helpers and fixtures, the autouse one included)

FAST = ["-q", "--method", "rtn", "--format", "gptq", "--bits", "4", "--group-size", "32"]
UP1 = "model.layers.1.mlp.up_proj.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
HANG_S = 120  # a refusal takes seconds; this long means the run is blocked on a FIFO


def test_the_fifo_watchdog_unblocks_a_stuck_reader(tmp_path):
    """Control: a read blocked on a FIFO is released by the watchdog and reported as hung."""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with fifo_watchdog([fifo], seconds=1) as hung:
        with open(fifo, "rb") as fh:  # blocks until a writer comes
            assert fh.read() == b""
    assert hung == [True]


# -- 1. no foreign code without --trust-remote-code -------------------------------------------------------------

FOREIGN = {"configuration_evil": "EvilConfig", "modeling_evil": "EvilForCausalLM", "tokenization_evil": "EvilTokenizer"}


def add_foreign_code(d: Path, markers: Path, *, model_known=True, tokenizer_known=True) -> None:
    """Python files that leave a marker in `markers` when imported, named by config.json's and
    tokenizer_config.json's auto_map; model_known=False: a model_type transformers does not know."""
    markers.mkdir(exist_ok=True)
    for mod, cls in FOREIGN.items():
        (d / f"{mod}.py").write_text(
            f"import pathlib\npathlib.Path({str(markers / mod)!r}).write_text('ran')\nclass {cls}:\n    pass\n"
        )

    def cfg(c):
        c["auto_map"] = {
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        }
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
    "calibration-written-by-the-model": [
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
        "400",
        "--seq-len",
        "128",
    ],
    "dataset-self": [
        "-q",
        "--method",
        "gptq",
        "--format",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--dataset",
        "self",
        "--num-samples",
        "4",
        "--seq-len",
        "16",
    ],
    "no-stream": FAST + ["--no-stream"],
}


def test_calibration_case_really_makes_the_model_write(base_model):
    """The premise of `calibration-written-by-the-model`: the built-in text holds fewer than 400 windows of 128 of
    the tiny model's tokens, so the model itself must write the rest (calibration.from_builtin)."""
    from transformers import AutoTokenizer

    from compress_export.io.calibration import builtin_text

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
    from compress_export.core.errors import UserError

    markers = tmp_path / "markers"
    add_foreign_code(src, markers, model_known=known)
    out = tmp_path / "out"
    qc = CompressionConfig(method="rtn", format="gptq", bits=4, group_size=32)
    with untouched(tmp_path, inputs=[src], outputs=[out]):
        if known:
            model = AutoCompressedModelForCausalLM.from_pretrained(
                src, export=True, quantization_config=qc, output_dir=str(out), progress=False, dtype=torch.float32
            )
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
            assert torch.isfinite(logits).all()
            assert type(model).__name__ == "LlamaForCausalLM"
        else:
            with pytest.raises(UserError) as e:
                AutoCompressedModelForCausalLM.from_pretrained(
                    src, export=True, quantization_config=qc, output_dir=str(out), progress=False
                )
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
    args = {
        "compress": [*FAST, src, "-o", tmp_path / "out"],
        "eval": ["eval", src, "--text", text],
        "convert": ["convert", src, "--format", "awq", "-o", tmp_path / "out"],
        "check": ["check", src],
    }[verb]
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
    args = {
        "eval": ["eval", export, "--text", text],
        "convert": ["convert", export, "--format", "awq", "-o", out],
        "check": ["check", export],
    }[verb]
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
    args = {
        "eval": ["eval", export, "--text", text],
        "convert": ["convert", export, "--format", "awq", "-o", out],
        "check": ["check", export],
    }[verb]
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
