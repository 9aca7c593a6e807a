"""The boundary module (compress_export/safety.py) and the pre-flight checks beside it, case by case: the review's
hostile configs, tokenizers and marks, each checked against a hand-written expectation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_tiny_llama

from compress_export.cli.main import main
from compress_export.core.errors import UserError
from compress_export.io.calibration import check_calibration_size, read_text
from compress_export.io.safety import is_our_output, read_mark, write_mark

FAST = ["-q", "--method", "rtn", "--format", "gptq", "--bits", "4", "--group-size", "32"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("safety") / "tiny")


@pytest.fixture
def src(base, tmp_path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(base, d)
    return d


def refused(capsys, argv, *needles):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "internal error" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_tokenizer_file_reference_outside_the_folder_is_refused(src, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    edit_json(src / "tokenizer_config.json", vocab_file=str(secret))
    refused(capsys, [*FAST, src, "-o", tmp_path / "out"], "vocab_file", "outside the folder")
    edit_json(src / "tokenizer_config.json", vocab_file=None, fast_tokenizer_files=["../secret.json"])
    refused(capsys, [*FAST, src, "-o", tmp_path / "out"], "fast_tokenizer_files")
    assert not (tmp_path / "out").exists()


def test_stale_absolute_path_from_the_authors_machine_is_harmless(src, tmp_path, capsys):
    """Common in hub configs: a path that exists nowhere here cannot be opened by transformers either."""
    edit_json(src / "tokenizer_config.json", special_tokens_map_file="/home/author/nowhere/special_tokens_map.json")
    assert main([str(a) for a in [*FAST, src, "-o", tmp_path / "out"]]) == 0


def test_configuration_files_are_refused(src, tmp_path, capsys):
    edit_json(src / "config.json", configuration_files=["config.4.0.json"])
    refused(capsys, [*FAST, src, "-o", tmp_path / "out"], "configuration_files")


@pytest.mark.parametrize(
    "change",
    [
        dict(model_type=["llama"], auto_map={"AutoModelForCausalLM": "m.X"}),
        dict(num_attention_heads=0),
        dict(max_position_embeddings="x"),
    ],
)
def test_malformed_config_is_one_line(src, tmp_path, capsys, change):
    edit_json(src / "config.json", **change)
    refused(capsys, [*FAST, src, "-o", tmp_path / "out"], str(src))


def test_broken_tokenizer_json_is_one_line(src, tmp_path, capsys):
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    refused(capsys, [*FAST, src, "-o", tmp_path / "out"], "tokenizer")


def test_tokenizer_beyond_the_vocabulary_is_refused(src, tmp_path, capsys):
    edit_json(src / "config.json", vocab_size=4)  # the tokenizer gives ids up to ~40; embeddings resized to match
    from safetensors.torch import load_file, save_file

    t = load_file(src / "model.safetensors")
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:4].clone()
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 200)
    refused(
        capsys,
        [
            "-q",
            "--method",
            "gptq",
            "--bits",
            "4",
            "--group-size",
            "32",
            src,
            "-o",
            tmp_path / "out",
            "--dataset",
            text,
            "--num-samples",
            "2",
            "--seq-len",
            "32",
        ],
        "vocab_size 4",
    )


def test_export_without_trust_leaves_the_folders_code_out(src, tmp_path, capsys):
    edit_json(src / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    edit_json(src / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    (src / "modeling_x.py").write_text("raise SystemExit('never imported')\n")
    (src / "tokenization_x.py").write_text("raise SystemExit('never imported')\n")
    out = tmp_path / "out"
    assert main([str(a) for a in [*FAST, src, "-o", out]]) == 0
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(out.glob("*.py"))


def test_marks_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mark").symlink_to(victim)
    write_mark(tmp_path / "d" / "mark", "123 host\n")
    assert victim.read_text() == "precious" and not (tmp_path / "d" / "mark").is_symlink()
    assert read_mark(tmp_path / "d" / "mark") == "123 host\n"
    (tmp_path / "d" / "link").symlink_to(victim)
    with pytest.raises(OSError):  # O_NOFOLLOW: a link is not a mark
        read_mark(tmp_path / "d" / "link")


def test_a_report_of_an_older_version_counts_as_ours(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(json.dumps({"runs": {}, "verdict": [], "engine": {}}))
    assert is_our_output(tmp_path / "r")
    (tmp_path / "r" / "report.json").write_text(json.dumps({"mine": 1}))
    assert not is_our_output(tmp_path / "r")


def test_memory_preflight_uses_the_runs_own_batching(monkeypatch):
    """An 8B-shaped model, 128 × 2048 tokens: the run batches 6 samples per forward, so ~12 GB of activations
    (2·128·2048·4096·4 B for the layer states + 6·32·2048²·4 B of attention scores), which 40 GB holds; asking
    for 100k samples of 512 tokens (~1.7 TB of states) is refused before any weight is read."""
    monkeypatch.setattr("compress_export.io.calibration.available_memory", lambda: 40e9)
    cfg = SimpleNamespace(
        max_position_embeddings=8192, hidden_size=4096, num_attention_heads=32, intermediate_size=14336
    )
    cpu = SimpleNamespace(type="cpu")
    check_calibration_size(128, 2048, None, cfg, cpu)
    with pytest.raises(UserError, match="--num-samples 100000 × --seq-len 512 needs at least"):
        check_calibration_size(100000, 512, None, cfg, cpu)
    with pytest.raises(UserError, match="max_position_embeddings 8192"):
        check_calibration_size(1, 8193, None, cfg, cpu)


@pytest.mark.parametrize(
    "line,why",
    [
        ('{"text": 5}', "`text` field holding a string"),
        ('[1, 2]', "`text` field holding a string"),
        ('{"txt": "a"}', "`text` field holding a string"),
    ],
)
def test_jsonl_dataset_lines_must_hold_text(tmp_path, line, why):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"{p}:2: .*{why}"):
        read_text(p)
    p.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_text(p)


def test_home_unset_does_not_break_the_output_check(tmp_path, monkeypatch):
    from compress_export.io.safety import check_output

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert check_output(tmp_path / "new", [tmp_path / "src"], False) == tmp_path / "new"
    assert os.path.lexists(tmp_path / "new") is False
