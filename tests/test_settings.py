"""COMPRESS_EXPORT_* settings: declared once (compress_export/core/settings.py), read only through it, listed in
the README from the declaration, checked when read, and unknown names in the environment named with a suggestion."""

import logging
import re
from pathlib import Path

import pytest

from compress_export.core import settings
from compress_export.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CODE = ("compress_export", "formats", "kernels", "integrations")
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"
READERS = {"install": ("scripts",), "tests": ("tests",)}  # the settings the package itself does not read


def code_files(folders=CODE, suffixes=(".py", ".c", ".h")):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in suffixes and "__pycache__" not in path.parts:
                yield path


def test_readme_lists_exactly_the_declared_settings():
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, f"README.md needs the {BEGIN} ... {END} markers"
    listed = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert listed.strip() == settings.markdown_table().strip(), (
        "README.md's settings table is stale: paste the output of python scripts/settings_table.py between the markers"
    )


@pytest.mark.parametrize("name", sorted(settings.SETTINGS))
def test_every_declared_setting_is_read_somewhere(name):
    s = settings.SETTINGS[name]
    if s.scope == "runtime":  # the package reads it through settings.get
        pattern = re.compile(r"settings\.get\(\s*[\"']" + name + r"[\"']")
        files = code_files()
    else:  # a shell script or the test suite reads it by its full name
        pattern = re.compile(re.escape(s.env))
        files = (p for p in code_files(READERS[s.scope], (".py", ".sh")) if p.name != "test_settings.py")
    assert any(pattern.search(p.read_text(errors="replace")) for p in files), f"{s.env} is declared but never read"


def test_no_environment_read_of_a_setting_outside_settings_py():
    """os.environ / getenv of a COMPRESS_EXPORT_ name, directly or through a module constant, only in settings.py;
    the C code reads no environment at all (kernels/cpu_wna16.py hands it its setting)."""
    own = ROOT / "compress_export" / "core" / "settings.py"
    bad = []
    for path in code_files():
        if path == own:
            continue
        text = path.read_text(errors="replace")
        if path.suffix in (".c", ".h"):
            bad += [f"{path}: getenv" for _ in re.finditer(r"\bgetenv\s*\(", text)]
            continue
        names = re.findall(r"^(\w+)\s*=\s*[\"']" + settings.PREFIX, text, re.M)  # ENV = "COMPRESS_EXPORT_..."
        keys = [re.escape(settings.PREFIX)] + [r"\b" + n + r"\b" for n in names]
        reads = r"(environ\s*(\.get\(|\[)|getenv\s*\()\s*(f?[\"'])?(" + "|".join(keys) + ")"
        bad += [f"{path}:{text[: m.start()].count(chr(10)) + 1}" for m in re.finditer(reads, text)]
    assert not bad, "read these through compress_export.core.settings.get: " + ", ".join(bad)


def test_defaults_when_unset_or_empty(monkeypatch):
    for s in settings.SETTINGS.values():
        monkeypatch.delenv(s.env, raising=False)
        assert settings.get(s.name) == s.default
        monkeypatch.setenv(s.env, "")
        assert settings.get(s.env) == s.default  # the full name works too
    with pytest.raises(KeyError, match="COMPRESS_EXPORT_NOPE is not a declared setting"):
        settings.get("COMPRESS_EXPORT_NOPE")


def test_good_values_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("COMPRESS_EXPORT_VLLM", "never")
    assert settings.get("VLLM") == "never"
    monkeypatch.setenv("COMPRESS_EXPORT_VLLM", "always")
    assert settings.get("VLLM") == "always"
    monkeypatch.setenv("COMPRESS_EXPORT_SKIP_VLLM", "1")
    assert settings.get("SKIP_VLLM") is True
    monkeypatch.setenv("COMPRESS_EXPORT_CACHE", "/tmp/somewhere")
    assert settings.get("CACHE") == "/tmp/somewhere"


def test_a_bad_value_warns_once_naming_the_choices_and_falls_back(monkeypatch, caplog):
    monkeypatch.setenv("COMPRESS_EXPORT_VLLM", "alway")
    with caplog.at_level(logging.WARNING, logger="compress_export"):
        assert settings.get("VLLM") == "auto"
    assert [r.getMessage() for r in caplog.records] == [
        "COMPRESS_EXPORT_VLLM=alway is not one of ('auto', 'always', 'never'); using auto"
    ]
    caplog.clear()
    monkeypatch.setenv("COMPRESS_EXPORT_SKIP_VLLM", "maybe")
    with caplog.at_level(logging.WARNING, logger="compress_export"):
        assert settings.get("SKIP_VLLM") is False
    assert len(caplog.records) == 1 and "COMPRESS_EXPORT_SKIP_VLLM=maybe" in caplog.text


def test_a_bad_value_of_a_strict_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("COMPRESS_EXPORT_LOWRANK", "fuse")
    with pytest.raises(UserError, match="COMPRESS_EXPORT_LOWRANK=fuse is not one of lora, fused"):
        settings.get("LOWRANK")


def test_routes_read_through_settings(monkeypatch, caplog):
    """The engines' own readers keep their behaviour: a bad route warns and counts as auto."""
    pytest.importorskip("transformers")
    from compress_export.integrations import transformers_quantizer

    monkeypatch.setenv("COMPRESS_EXPORT_TRANSFORMERS", "mine")
    with caplog.at_level(logging.WARNING, logger="compress_export"):
        assert transformers_quantizer._route() == "auto"
    assert "COMPRESS_EXPORT_TRANSFORMERS=mine is not one of ('auto', 'ours', 'theirs'); using auto" in caplog.text


def test_an_unknown_name_warns_once_with_the_closest_known_one(monkeypatch, caplog):
    monkeypatch.setattr(settings, "_warned_unknown", False)
    monkeypatch.setenv("COMPRESS_EXPORT_VLLN", "never")
    monkeypatch.setenv("COMPRESS_EXPORT_CPUISA", "generic")
    assert settings.unknown()["COMPRESS_EXPORT_VLLN"] == "COMPRESS_EXPORT_VLLM"
    with caplog.at_level(logging.WARNING, logger="compress_export"):
        settings.warn_unknown()
        settings.warn_unknown()  # once per process
    assert sorted(r.getMessage() for r in caplog.records) == [
        "COMPRESS_EXPORT_CPUISA is not a compress-export setting and is ignored (did you mean COMPRESS_EXPORT_CPU_ISA?)",
        "COMPRESS_EXPORT_VLLN is not a compress-export setting and is ignored (did you mean COMPRESS_EXPORT_VLLM?)",
    ]


def test_known_names_raise_no_warning(monkeypatch):
    env = {s.env: "x" for s in settings.SETTINGS.values()}
    assert settings.unknown({**env, "PATH": "/bin", "COMPRESS_EXPORTER": "y"}) == {}


def test_settings_is_cheap_to_import():
    import subprocess
    import sys

    code = "import sys, compress_export.core.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
