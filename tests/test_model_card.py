"""The model card every export carries (compress_export/io/model_card.py): its metadata header parses as YAML
(the hub's card format), it names the source by its config.json's hash, the pass, format, scheme and calibration
as the export's own config records them, keeps the source's card and license, and `eval --card` records figures."""

import hashlib
import json
import shutil

import pytest
import yaml
from test_cli import assert_one_line_error, cli

from compress_export import CompressionConfig, compress


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


@pytest.fixture(scope="module")
def carded_source(tiny_model, tmp_path_factory):
    """The tiny model with a card of its own (a license header and a body) and a hub name in its config."""
    src = tmp_path_factory.mktemp("card") / "tiny-src"
    shutil.copytree(tiny_model, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["_name_or_path"] = "someone/tiny-llama"
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# Tiny\n\nThe source's own words.\n"
    )
    return src


@pytest.fixture(scope="module")
def export(carded_source, tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("card-out") / "tiny-w4"
    cfg = CompressionConfig(method="gptq", bits=4, group_size=32, dataset=str(tiny_text), num_samples=4, seq_len=32)
    compress(str(carded_source), str(out), cfg)
    return out


def test_card_header_and_facts(export, carded_source):
    text = (export / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "someone/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]  # the source's license still holds
    assert {"compress-export", "gptq", "4-bit"} <= set(meta["tags"])
    want = hashlib.sha256((carded_source / "config.json").read_bytes()).hexdigest()
    assert want in text
    qc = json.loads((export / "config.json").read_text())["quantization_config"]
    assert qc["compress_export"]["calibration"] in text
    assert "4-bit weights, groups of 32, symmetric" in text
    body = text.split("## The source model's card", 1)[1]
    assert "The source's own words." in body and "license:" not in body  # kept once, without its header


def test_eval_card_records_and_replaces_a_figure(export, tiny_text, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(export, out)
    for windows in ("1", "2"):
        rc, so, err = cli("eval", out, "--text", tiny_text, "--windows", windows, "--window", "64", "--card", "--json")
        assert rc == 0, err
    ppl = json.loads(so)["token_perplexity"]
    text = (out / "README.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| token perplexity |")]
    assert len(rows) == 1, rows  # the same text measured again replaces its row
    assert f"| {ppl:.3f} |" in rows[0] and "2×64 tokens" in rows[0]
    assert front_matter(text)["license"] == "apache-2.0"  # still a valid card, the source's license kept
    rc, so, err = cli("eval", out, "--tasks", "x", "--card")
    assert_one_line_error(rc, err, "--card", "--text")


def test_eval_card_refuses_a_folder_we_did_not_write(tiny_model, tiny_text, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_model, src)
    rc, so, err = cli("eval", src, "--text", tiny_text, "--windows", "1", "--window", "64", "--card")
    assert_one_line_error(rc, err, "--card", "not an export written by compress-export")
    assert not (src / "README.md").exists()


def test_convert_keeps_the_source_facts(export, carded_source, tmp_path):
    out = tmp_path / "ct"
    rc, so, err = cli("convert", export, "--format", "compressed-tensors", "-o", out)
    assert rc == 0, err
    text = (out / "README.md").read_text()
    assert hashlib.sha256((carded_source / "config.json").read_bytes()).hexdigest() in text
    assert "converted from" in text and "a gptq export" in text
    assert text.count("The source's own words.") == 1
    meta = front_matter(text)
    assert meta["base_model"] == "someone/tiny-llama" and meta["license"] == "apache-2.0"  # carried on by our card


@pytest.mark.parametrize(
    "header",
    ["license: mit\n? base_model\n: x", "license: mit\nfoo bar", "license: *a", "license: {a: 1}\nlanguage: [1, 2]"],
)
def test_a_strangers_header_cannot_change_or_break_ours(tmp_path, header):
    from compress_export.io.model_card import card_text, kept_metadata

    cfg = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}}
    source = f"---\n{header}\n---\nbody\n"
    text = card_text(cfg, "x", source_card=source, meta_src=kept_metadata(source))
    meta = front_matter(text)
    assert "base_model" not in meta and set(meta) <= {"library_name", "pipeline_tag", "tags", "license", "language"}
    assert meta.get("license") in (None, "mit")
