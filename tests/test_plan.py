"""One plan, resolved once: CompressionConfig is a validated pydantic model whose errors name their field, its JSON
schema is published, and plan.resolve decides every default once (format, pass, scheme against the model,
modifiers, calibration, output)."""

import dataclasses
import json

import pytest
from pydantic import ValidationError

from compress_export.core.errors import UserError
from compress_export.pipeline.config import CompressionConfig
from compress_export.pipeline.plan import Plan, resolve


def test_bad_values_are_one_user_error_naming_the_field():
    with pytest.raises(UserError, match=r"^recipe.json: field 'bits': .*valid integer.*'four'"):
        CompressionConfig.from_dict({"bits": "four"}, where="recipe.json")
    with pytest.raises(UserError, match=r"^CompressionConfig: field 'num_samples': num_samples must be at least 1"):
        CompressionConfig(num_samples=0)
    with pytest.raises(UserError, match=r"field 'method': unknown method 'gtpq'; choose one of: .*gptq"):
        CompressionConfig(method="gtpq")
    with pytest.raises(UserError, match=r"unknown setting\(s\) \['bitz'\]; valid ones are \['act_order'"):
        CompressionConfig.from_dict({"bitz": 4}, where="r.json")
    with pytest.raises(UserError, match="want a JSON object"):
        CompressionConfig.from_dict([1], where="r.json")


def test_config_is_frozen_typed_and_round_trips(tmp_path):
    cfg = CompressionConfig(method="gptq", bits=3, group_size=32, sparsity=None, dataset="calib.txt")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.bits = 4
    assert CompressionConfig.load(cfg.save(tmp_path / "r.json")) == cfg
    assert json.loads((tmp_path / "r.json").read_text()) == cfg.to_dict()
    assert list(cfg.to_dict())[:3] == ["method", "format", "scheme"]  # the recipe file keeps the field order
    assert cfg.with_(bits=None, seed=3) == CompressionConfig(**{**cfg.to_dict(), "seed": 3})
    assert CompressionConfig(sparsity=0.5).sparsity == "0.5"  # a number means the fraction
    assert hash(cfg) == hash(CompressionConfig(**cfg.to_dict()))


def test_json_schema_is_published_by_the_cli(capsys):
    from compress_export.cli.main import main

    schema = CompressionConfig.json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(CompressionConfig.model_fields)
    assert "gptq" in schema["properties"]["method"]["anyOf"][0]["enum"]
    assert "W8A8" in schema["properties"]["scheme"]["anyOf"][0]["enum"]
    assert main(["recipe", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema


def test_cli_checks_a_recipe_naming_its_field(tmp_path, capsys):
    from compress_export.cli.main import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "rtn", "damp": 2}')
    assert main(["recipe", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--recipe {bad}: field 'damp': damp must be in [0, 1)" in err
    good = CompressionConfig(method="rtn", bits=8).save(tmp_path / "good.json")
    assert main(["recipe", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["bits"] == 8


def test_resolve_decides_every_default_once(tiny_model, tmp_path):
    plan = resolve(CompressionConfig(), tiny_model, tmp_path / "o")
    assert isinstance(plan, Plan) and plan.method == "gptq" and plan.format.name == "gptq"
    assert plan.scheme.bits == 4 and plan.scheme.group_size == 64  # 128 does not divide the tiny model's 64
    assert plan.calibration.needed and plan.calibration.num_samples == 64
    assert [(m.name, m.alpha) for m in plan.modifiers] == [("asymmetric", 0.5)]  # GPTAQ's target by default
    assert plan.out == tmp_path / "o" and not plan.overwrite and plan.device == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.out = tmp_path / "elsewhere"
    rtn = resolve(CompressionConfig(method="rtn", group_size=32), tiny_model, tmp_path / "r")
    assert not rtn.calibration.needed and rtn.scheme.act_order == "none"
    pruned = resolve(CompressionConfig(sparsity="2:4"), tiny_model, tmp_path / "p")
    assert pruned.format.name == "sparse24" and pruned.scheme is None and str(pruned.sparsity) == "2:4"


def test_resolve_plans_the_modifiers(tiny_model, tmp_path):
    w8a8 = resolve(CompressionConfig(scheme="W8A8", method="rtn", lowrank_rank=4), tiny_model, tmp_path / "w")
    assert w8a8.format.name == "compressed-tensors"
    assert [m.name for m in w8a8.modifiers] == ["smoothquant", "lowrank"]
    assert w8a8.calibration.needed  # SmoothQuant calibrates RTN
    assert w8a8.summary_fields() == {"smoothquant": 0.5, "lowrank_rank": 4}
    off = resolve(CompressionConfig(scheme="W8A8", method="rtn", smoothquant=0), tiny_model, tmp_path / "x")
    assert off.modifiers == () and not off.calibration.needed


def test_resolve_checks_before_any_work(tiny_model, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        resolve(CompressionConfig(method="rtn"), tiny_model, tmp_path / "taken")
    with pytest.raises(UserError, match="needs --sparsity"):
        resolve(CompressionConfig(method="wanda"), tiny_model, tmp_path / "o")
    with pytest.raises(UserError, match="W8A8"):
        resolve(CompressionConfig(method="gptq", smoothquant=0.5), tiny_model, tmp_path / "o")
    assert not (tmp_path / "o").exists()
