"""Modifiers with a lifecycle: SmoothQuant, asymmetric calibration, the low-rank correction and recovery are
registered modifiers, the pipeline calls every planned modifier's hooks in order and knows nothing about any one of
them, and a new modifier is one class plus one registration."""

import ast
import json
from pathlib import Path

import pytest

from compress_export.core.errors import UserError
from compress_export.modifiers.base import MODIFIERS, Modifier
from compress_export.pipeline.compress import compress
from compress_export.pipeline.config import CompressionConfig


def test_builtin_modifiers_are_registered():
    assert MODIFIERS.names() == ["asymmetric", "lowrank", "recover", "smoothquant"]
    from compress_export.modifiers.lowrank import LowRank
    from compress_export.modifiers.smoothing import SmoothQuant

    assert MODIFIERS.get("lowrank") is LowRank and MODIFIERS.get("smoothquant") is SmoothQuant
    with pytest.raises(UserError, match="unknown modifier 'nope'"):
        MODIFIERS.get("nope")


def test_the_pipeline_imports_no_particular_modifier():
    import compress_export.pipeline.compress as pipeline

    tree = ast.parse(Path(pipeline.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "compress_export.modifiers.base" in imported
    assert (
        not {
            "compress_export.modifiers.smoothing",
            "compress_export.modifiers.lowrank",
            "compress_export.modifiers.recover",
            "compress_export.modifiers.asymmetric",
            "compress_export.io.lowrank",
        }
        & imported
    )


class Probe(Modifier):
    """Records every hook call; asks for calibration, so RTN calibrates for it."""

    needs_calibration = True
    calls: list = []

    @classmethod
    def plan(cls, config, ctx):
        return cls() if config.seed == 7 else None  # on only for the test's runs

    def check(self, layout):
        self.calls.append(("check", len(layout.layers)))

    def before_pass(self, ctx):
        self.calls.append(("before_pass",))

    def before_layer(self, ctx, index, layer, states):
        self.calls.append(("before_layer", index, states is not None))

    def after_group(self, ctx, names, weights, results, stats):
        assert len(names) == len(weights) == len(results)
        self.calls.append(("after_group", tuple(names)))

    def after_linear(self, ctx, name, result):
        self.calls.append(("after_linear", name))

    def after_layer(self, ctx, index, layer):
        self.calls.append(("after_layer", index))

    def at_export(self, ctx, folder, extra):
        (Path(folder) / "probe.txt").write_text("written at export")
        extra["probe"] = {"layers": len(ctx.layout.layers)}


@pytest.fixture
def probe(monkeypatch):
    MODIFIERS.names()  # the built-ins first, then ours (as a plugin would add one)
    monkeypatch.setitem(MODIFIERS._items, "probe", Probe)
    monkeypatch.setattr(Probe, "name", "probe", raising=False)
    Probe.calls = []
    yield Probe
    Probe.calls = []


def test_a_new_modifier_is_one_class_and_one_registration(probe, tiny_model, tiny_text, tmp_path):
    out = tmp_path / "o"
    s = compress(
        tiny_model,
        out,
        CompressionConfig(method="rtn", group_size=32, seed=7, dataset=str(tiny_text), num_samples=4, seq_len=16),
        progress=False,
    )
    calls = probe.calls
    assert calls[0] == ("check", 2) and calls[1] == ("before_pass",)
    layers = [c for c in calls if c[0] in ("before_layer", "after_layer")]
    assert layers == [("before_layer", 0, True), ("after_layer", 0), ("before_layer", 1, True), ("after_layer", 1)]
    linears = [c[1] for c in calls if c[0] == "after_linear"]
    assert len(linears) == s.linears == 14 and len(set(linears)) == 14
    assert sum(len(c[1]) for c in calls if c[0] == "after_group") == 14
    assert "none (RTN)" not in s.calibration  # the modifier asked for calibration inputs
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["compress_export"]["probe"] == {"layers": 2}
    assert (out / "probe.txt").read_text() == "written at export"
    probe.calls = []
    compress(tiny_model, tmp_path / "off", CompressionConfig(method="rtn", group_size=32), progress=False)
    assert probe.calls == []  # not planned: never called


def test_modifier_checks_are_collected_before_any_weight(tiny_model, tmp_path):
    with pytest.raises(UserError, match="--lowrank-rank 100 exceeds"):
        compress(tiny_model, tmp_path / "x", CompressionConfig(method="rtn", lowrank_rank=100), progress=False)
    assert not (tmp_path / "x").exists()


def test_builtin_modifiers_record_their_extras(tiny_model, tiny_text, tmp_path):
    out = tmp_path / "w8"
    s = compress(
        tiny_model,
        out,
        CompressionConfig(
            scheme="W8A8", method="rtn", lowrank_rank=4, dataset=str(tiny_text), num_samples=4, seq_len=16
        ),
        progress=False,
    )
    assert s.smoothquant == 0.5 and s.lowrank_rank == 4
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["compress_export"]
    assert extra["smoothquant"] == 0.5 and extra["lowrank"] == {"rank": 4, "adapter": "lowrank"}
    assert (out / "lowrank" / "adapter_model.safetensors").is_file()
