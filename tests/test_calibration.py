"""Calibration sources: the built-in text (the default), .txt, .jsonl, the model's own text (`self`);
deterministic chunks; the model-written remainder; clear errors."""

import json

import pytest
import torch

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.io.calibration import PROMPT_TOKENS, builtin_text, calibration_ids, calibration_set
from compress_export.io.loading import load_model
from compress_export.pipeline.compress import compress


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def word_tok():
    """A whitespace word-level tokenizer that knows every word of the built-in text, so its ids decode back to
    the text's own words: an independent view of what the calibration samples contain."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(builtin_text().split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_txt_chunks_are_the_first_n_windows(tiny, tiny_text):
    model, tok = tiny
    ids = calibration_ids(model, tok, str(tiny_text), 3, 16)
    whole = tok(tiny_text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert ids.shape == (3, 16)
    assert torch.equal(ids.flatten(), whole[:48])


def test_jsonl_text_field(tiny, tmp_path):
    model, tok = tiny
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog"}) for _ in range(20)))
    assert calibration_ids(model, tok, str(p), 4, 8).shape == (4, 8)
    p.write_text('{"body": "no text field"}\n')
    with pytest.raises(UserError, match="c.jsonl:1.*`text` field"):
        calibration_ids(model, tok, str(p), 4, 8)


def test_too_short_dataset_is_an_error(tiny, tmp_path):
    model, tok = tiny
    p = tmp_path / "short.txt"
    p.write_text("the fox")
    with pytest.raises(UserError, match="fewer than one sample of --seq-len 64"):
        calibration_ids(model, tok, str(p), 4, 64)


def never_loaded():
    pytest.fail("the built-in text needs no model unless it runs out")


def test_builtin_is_the_default_real_text_and_needs_no_model(word_tok):
    ids, desc = calibration_set(never_loaded, word_tok, None, 5, 40)
    assert ids.shape == (5, 40) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_ids(never_loaded, word_tok, "builtin", 5, 40))  # the same source, named
    assert torch.equal(ids, calibration_ids(never_loaded, word_tok, None, 5, 40))  # deterministic
    assert "built-in calibration text" in desc and "continued" not in desc
    # the first sample is the text's opening words, as written in the corpus file
    opening = "The morning ferry left the harbour at seven, whatever the weather,"
    assert word_tok.decode(ids[0][:11]) == opening
    assert word_tok.decode(ids[0]) == " ".join(builtin_text().split()[:40])
    assert (ids != word_tok.unk_token_id).all()


def test_builtin_windows_are_spread_over_the_whole_text(word_tok):
    words = builtin_text().split()
    count = len(words) // 200  # whole windows of 200 tokens
    every = calibration_ids(never_loaded, word_tok, None, count, 200)
    assert word_tok.decode(every.flatten()) == " ".join(words[: count * 200])  # all of them: the text in order
    few = calibration_ids(never_loaded, word_tok, None, 4, 200)
    rows = [next(i for i in range(count) if torch.equal(every[i], r)) for r in few]
    assert rows[0] == 0 and rows == sorted(set(rows)) and rows[-1] >= count * 3 // 4  # not just the first four


def test_builtin_remainder_is_written_by_the_model_and_seeded(tiny):
    model, tok = tiny
    words = tok(builtin_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    seq_len = 40  # short samples: the model writes only seq_len - prompt tokens of each (a few seconds here)
    count, prompt = words.numel() // seq_len, min(PROMPT_TOKENS, seq_len // 2)
    loads = []

    def loader():
        loads.append(1)
        return model

    ids, desc = calibration_set(loader, tok, None, count + 2, seq_len, seed=1)
    assert ids.shape == (count + 2, seq_len) and len(loads) == 1  # loaded once, and only because it ran out
    assert torch.equal(ids[:count].flatten(), words[: count * seq_len])  # every real window first
    assert "2 samples continued by the model" in desc
    for row in ids[count:]:  # each written sample starts with a passage of the text
        assert any(torch.equal(words[s : s + prompt], row[:prompt]) for s in range(words.numel() - prompt))
    assert (ids[count:] < model.config.vocab_size).all()
    assert not torch.isin(ids[count:, prompt:], torch.tensor(tok.all_special_ids)).any()  # no special tokens
    assert torch.equal(ids, calibration_ids(model, tok, None, count + 2, seq_len, seed=1))
    assert not torch.equal(ids[count:], calibration_ids(model, tok, None, count + 2, seq_len, seed=2)[count:])


def test_self_mode_is_seeded_and_shaped(tiny):
    model, tok = tiny
    a, desc = calibration_set(model, tok, "self", 3, 12, seed=1)
    b = calibration_ids(model, tok, "self", 3, 12, seed=1)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert len(set(a[:, 0].tolist())) > 1  # different random starts
    assert "model itself" in desc and "--dataset self" in desc


def test_bad_values_name_the_option(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match=r"--dataset slef does not exist .*`builtin`.*`self`"):
        calibration_ids(model, tok, "slef", 2, 8)
    with pytest.raises(UserError, match="--num-samples must be"):
        calibration_ids(model, tok, None, 0, 8)
    with pytest.raises(UserError, match="--seq-len ≥ 2"):
        calibration_ids(model, tok, "builtin", 2, 1)


def test_pipeline_records_the_source(tiny_model, tmp_path):
    """The export's summary (and quantization_config) say which text calibrated it."""
    run = dict(method="gptq", scheme=Scheme(4, 32, True), num_samples=2, seq_len=16, progress=False)
    s = compress(tiny_model, tmp_path / "default", **run)
    assert s.calibration == "2×16 tokens from the built-in calibration text (--dataset builtin)"
    cfg = json.loads((tmp_path / "default" / "config.json").read_text())
    assert cfg["quantization_config"]["compress_export"]["calibration"] == s.calibration
    s = compress(tiny_model, tmp_path / "self", dataset="self", **run)
    assert s.calibration.startswith("2×16 tokens from the model itself (--dataset self")
