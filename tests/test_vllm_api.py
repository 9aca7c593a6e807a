"""Every vLLM name compress-export uses (integrations/vllm_api.py) exists in the installed vLLM, and no other module
of ours imports vLLM. A vLLM release that moves a name fails here with one line naming it and its module."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, have_vllm

from compress_export.integrations import vllm_api

CHECK = """
import json, os
from compress_export.integrations.vllm_launch import cpu_environment
os.environ.update(cpu_environment())  # importing vLLM picks its platform (the AVX2 CPU wheel needs it set)
from compress_export.integrations import vllm_api
print("RESULT " + json.dumps({"problems": vllm_api.check_all(), "version": vllm_api.installed_version()}))
"""


@pytest.mark.vllm
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
def test_every_vllm_name_we_use_resolves():
    # in a subprocess, as every vLLM run of the suite: importing vLLM's modules sets its platform up for good
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT ") :])
    if res["problems"]:
        pytest.fail("\n".join(res["problems"]), pytrace=False)


def test_a_missing_name_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(vllm_api.NAMES, "gone", vllm_api.Name("json", "no_such_name", "0.32.0"))
    with pytest.raises(vllm_api.VllmApiError) as e:
        vllm_api.get("gone")
    msg = str(e.value)
    assert "\n" not in msg and "json.no_such_name" in msg and "'gone'" in msg and "0.32.0" in msg, msg


def test_every_name_records_the_vllm_version_it_was_checked_against():
    for name, n in vllm_api.NAMES.items():
        assert n.module.startswith("vllm") and n.attr and n.checked_against.count(".") == 2, (name, n)


def vllm_imports(path: Path) -> list:
    """(line, module) of every import of a vllm module in one file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else []
        )
        out += [(node.lineno, m) for m in names if m == "vllm" or m.startswith("vllm.")]
    return out


def test_only_vllm_api_imports_vllm():
    found = {p.name: vllm_imports(p) for p in sorted((ROOT / "integrations").glob("*.py")) if p.name != "vllm_api.py"}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    assert vllm_imports(ROOT / "integrations" / "vllm_api.py") == []  # it resolves names by importlib, lazily
