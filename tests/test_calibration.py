"""Calibration sources: .txt, .jsonl, data-free; deterministic chunks; clear errors."""
import json

import pytest
import torch

from compress_export.calibration import calibration_ids
from compress_export.errors import UserError
from compress_export.loading import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model)


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


def test_data_free_is_seeded_and_shaped(tiny):
    model, tok = tiny
    a = calibration_ids(model, tok, None, 3, 12, seed=1)
    b = calibration_ids(model, tok, None, 3, 12, seed=1)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert len(set(a[:, 0].tolist())) > 1  # different random starts
