"""`compress-export check OUT --tensor-parallel N`: whether vLLM can shard an export, worked out by hand on the tiny
Llama (4 query heads, 2 KV heads, hidden 64, MLP 128: o_proj reads 64 inputs, down_proj 128)."""

import pytest

from compress_export.cli.main import main
from compress_export.core.scheme import Scheme
from compress_export.integrations.tp_plan import plan
from compress_export.pipeline.compress import compress


def export(tiny_model, tiny_text, out, fmt, scheme, method="rtn"):
    compress(
        tiny_model,
        out,
        method=method,
        fmt=fmt,
        scheme=scheme,
        dataset=str(tiny_text),
        num_samples=4,
        seq_len=32,
        progress=False,
    )
    return out


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "awq"])
def test_group_boundaries_and_heads(tiny_model, tiny_text, tmp_path, fmt):
    r = plan(export(tiny_model, tiny_text, tmp_path / "o", fmt, Scheme(4, 32, fmt != "gptq", "none")))
    assert r[1]["ok"] and r[2]["ok"]  # 64/2 = 32 inputs per o_proj shard: one whole group
    assert not r[4]["ok"] and len(r[4]["problems"]) == 1  # 64/4 = 16 < 32; down_proj's 128/4 = 32 is fine
    assert "self_attn.o_proj [64×64]: group size 32 does not divide a shard's 16 inputs" in r[4]["problems"][0]
    why8 = "\n".join(r[8]["problems"])  # 4 heads cannot split 8 ways; o_proj 8 and down_proj 16 cut groups
    assert "num_attention_heads 4" in why8 and "o_proj" in why8 and "down_proj" in why8
    assert "num_key_value_heads" not in why8  # 2 KV heads are repeated over 8 ranks (8 % 2 == 0)


def test_per_channel_and_act_order_keep_their_groups_whole(tiny_model, tiny_text, tmp_path):
    pc = plan(export(tiny_model, tiny_text, tmp_path / "pc", "gptq", Scheme(4, -1, True, "none")))
    assert pc[4]["ok"] and not pc[4]["notes"]
    ao = plan(export(tiny_model, tiny_text, tmp_path / "ao", "gptq", Scheme(4, 32, True, "group"), "gptq"))
    assert ao[4]["ok"] and "act-order" in ao[4]["notes"][0] and not ao[1]["notes"]


def test_packed_words_along_the_split_axis(tiny_model, tiny_text, tmp_path):
    """3-bit GPTQ packs 32 values into 3 words, qweight along the inputs and qzeros along the outputs: at tp=2 the
    32-output k/v projections give 16-output shards (1.5 words of zeros); at tp=4 o_proj's 16-input shards end
    inside a qweight word too. 4-bit (8 per word) fits both."""
    r = plan(export(tiny_model, tiny_text, tmp_path / "o", "gptq", Scheme(3, -1, True, "none")), (2, 4))
    assert sorted(p.split(" [")[0] for p in r[2]["problems"]) == [
        "model.layers.*.self_attn.k_proj",
        "model.layers.*.self_attn.v_proj",
    ]
    assert all(
        "qzeros is packed along the outputs in words of 32/3 values; a shard of 16 outputs" in p
        for p in r[2]["problems"]
    )
    assert any(
        "o_proj [64×64]: qweight is packed along the inputs in words of 32/3 values; a shard of 16 inputs" in p
        for p in r[4]["problems"]
    )
    assert plan(export(tiny_model, tiny_text, tmp_path / "o4", "gptq", Scheme(4, -1, True, "none")), (2, 4))[4]["ok"]


def test_cli_check(tiny_model, tiny_text, tmp_path, capsys):
    out = export(tiny_model, tiny_text, tmp_path / "o", "gptq", Scheme(4, 32, True, "none"))
    assert main(["check", str(out), "--tensor-parallel", "2", "4"]) == 0
    text = capsys.readouterr().out
    assert "tp=2: can shard" in text and "tp=4: cannot shard" in text and "groups would be cut" in text
    assert main(["check", str(tiny_model)]) == 2  # not an export: one-line error
    assert "not an export" in capsys.readouterr().err
