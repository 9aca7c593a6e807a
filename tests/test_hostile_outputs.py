"""Hostile input, rules 4-8 (see test_hostile.py for the whole list and how each case checks): never damage what the user did not
name as output, no silent wrong numbers, no hangs, hostile headers and eval/serve inputs, OS faults."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from hostile import *  # noqa: F401,F403  (helpers and fixtures, the autouse one included)
from safetensors.torch import load_file, save_file

FAST = ["-q", "--method", "rtn", "--format", "gptq", "--bits", "4", "--group-size", "32"]
UP1 = "model.layers.1.mlp.up_proj.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
HANG_S = 120  # a refusal takes seconds; this long means the run is blocked on a FIFO


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
def test_overwrite_refuses_a_folder_compress_export_did_not_write(
    src, export, base_model, tmp_path, capsys, verb, kind
):
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
    from compress_export.core.errors import UserError

    qc = CompressionConfig(method="rtn", format="gptq", bits=4, group_size=32)
    with untouched(tmp_path, inputs=[src]):
        with pytest.raises(UserError):
            AutoCompressedModelForCausalLM.from_pretrained(
                src, export=True, quantization_config=qc, output_dir=str(src), progress=False
            )


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
        rc, _, err = run(capsys, "-q", "--method", "rtn", "--group-size", "48", src, "-o", out, "--save-recipe", recipe)
    assert_refused(rc, err, "--group-size 48")
    assert not recipe.exists() and not out.exists()


def test_save_recipe_is_written_by_a_successful_run(src, tmp_path, capsys):
    from compress_export.pipeline.config import CompressionConfig

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
    from compress_export.core.errors import UserError
    from compress_export.core.scheme import Scheme

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
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    dup = next(n for n in first if "layers" in n)
    (src / "model.safetensors").unlink()
    save_file({n: t[n] for n in first}, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(
        {n: t[n] for n in second + [dup]}, str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"}
    )
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
        rc, _, err = run(capsys, "-q", "--method", "gptq", "--group-size", "32", "--seq-len", "200000", src, "-o", out)
    assert time.time() - t < 30
    assert_refused(rc, err, "--seq-len", "max_position_embeddings")


# -- 7. hostile headers; eval and serve inputs -------------------------------------------------------------------


def _overlap(h):
    h[O0]["data_offsets"] = list(h[Q0]["data_offsets"])  # same size, same bytes


def _negative(h):
    h[Q0]["shape"] = [-64, 64]


def _f8(h):
    h[Q0]["dtype"], h[Q0]["shape"] = "F8_E4M3", [128, 64]  # the same bytes, read as one-byte floats


HEADERS = {
    "overlapping-offsets": (_overlap, ()),
    "negative-shape": (_negative, ()),
    "f8": (_f8, ("unsupported dtype F8_E4M3 in tensor",)),
}


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
    from compress_export.io import writer

    return {
        "ENOSPC-closing-a-shard": (
            writer._Shard,
            "close",
            OSError(errno.ENOSPC, "No space left on device", "part-00001.safetensors"),
        ),
        "EPERM-making-the-partial-folder": (
            writer.tempfile,
            "mkdtemp",
            PermissionError(errno.EPERM, "Operation not permitted", "out"),
        ),
        "EACCES-making-the-partial-folder": (
            writer.tempfile,
            "mkdtemp",
            PermissionError(errno.EACCES, "Permission denied", "out"),
        ),
        "EROFS-making-the-partial-folder": (
            writer.tempfile,
            "mkdtemp",
            OSError(errno.EROFS, "Read-only file system", "out"),
        ),
        "EMFILE-adding-a-tensor": (writer._Shard, "add", OSError(errno.EMFILE, "Too many open files")),
    }


FAULTS = [
    "ENOSPC-closing-a-shard",
    "EPERM-making-the-partial-folder",
    "EACCES-making-the-partial-folder",
    "EROFS-making-the-partial-folder",
    "EMFILE-adding-a-tensor",
]


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
    from compress_export.pipeline import compress as pipeline

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
    from compress_export.io.source import StreamedSource

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
