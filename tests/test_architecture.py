"""The architecture as rules a tool checks: the layers (import-linter), no import cycles, no reaching into engines
through stack frames or import hooks, source folders that cannot shadow installed packages, a quiet install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("formats", "kernels", "integrations")  # installed as compress_export.<name>
SOURCES = ("compress_export", *TOP_LEVEL)


def stage(dst: Path) -> Path:
    """compress_export laid out as the wheel lays it out (the top-level folders inside it), .py files only: the import
    graph tools read files, and in the checkout compress_export/formats etc. are only pointers to the top level."""
    pkg = dst / "compress_export"
    shutil.copytree(REPO / "compress_export", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "data"))
    for name in TOP_LEVEL:
        shutil.rmtree(pkg / name)
        shutil.copytree(REPO / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
        (pkg / name / "__init__.py").write_text("")  # the analysers want regular packages
    return dst


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return stage(tmp_path_factory.mktemp("staged"))


def test_layer_contracts_hold(staged):
    """pyproject.toml's import-linter contracts: no layer imports a higher one (function-level imports count)."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (the dev extra installs it)")
    r = subprocess.run(
        [str(lint), str(REPO / "pyproject.toml")],
        cwd=staged,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(staged)},
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", r.stdout), r.stdout[-2000:]


def test_no_import_cycles(staged):
    """No module reaches itself through its imports (a package's __init__ importing its own children is not a cycle)."""
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(staged))
    try:
        graph = grimp.build_graph("compress_export", cache_dir=None)
    finally:
        sys.path.remove(str(staged))
    cycles = []
    for a in sorted(graph.modules):
        for b in graph.find_modules_directly_imported_by(a):
            if a == b or a.startswith(b + ".") or b.startswith(a + "."):
                continue
            if graph.chain_exists(importer=b, imported=a):
                cycles.append(f"{a} -> {b} -> ... -> {a}")
    assert not cycles, "\n".join(cycles)


def test_engines_are_reached_through_public_extension_points():
    """No stack-frame walking, no import hooks, no patched standard library: each breaks on an engine's release."""
    banned = re.compile(r"_getframe|meta_path|path_hooks|importlib\.metadata\.version\s*=|md\.version\s*=")
    found = []
    for folder in SOURCES:
        for f in sorted((REPO / folder).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if banned.search(line):
                    found.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_top_level_folders_are_not_packages():
    """A folder with __init__.py in the checkout would shadow an installed package of its name (Hugging Face's
    `kernels`, which transformers imports) for anything run from the checkout."""
    for name in TOP_LEVEL:
        assert not (REPO / name / "__init__.py").exists(), f"{name}/__init__.py makes {name}/ a top-level package"


@pytest.fixture(scope="module")
def installed_kernels(tmp_path_factory) -> Path:
    """A stand-in for an installed Hugging Face `kernels` package (a regular package with its dist-info)."""
    site = tmp_path_factory.mktemp("site")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("__version__ = '0.12.0'\nCUDAProperties = 'hf-kernels'\n")
    info = site / "kernels-0.12.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.12.0\n")
    return site


def run_in_checkout(code: str, site: Path, timeout=300):
    """Python started with the checkout as its working directory, as the README's commands and examples are."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_installed_packages_win_over_our_folders_in_the_checkout(installed_kernels):
    code = (
        "import importlib, kernels, formats, integrations; from kernels import CUDAProperties; "
        "print(CUDAProperties, formats.__file__, integrations.__file__); "
        "import compress_export.kernels.base as kb; print('cpu-wna16' in kb.KERNELS.names())"
    )
    r = run_in_checkout(code, installed_kernels)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["hf-kernels", "None", "None", "True"], r.stdout


def test_cli_and_from_pretrained_run_from_the_checkout(installed_kernels, tiny_model, tmp_path):
    """The README's commands run in the checkout: `python -m compress_export ...`, then from_pretrained(OUT) in a
    script started there, with an installed package named like one of our folders on the path."""
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress_export",
            "--format",
            "gptq",
            "--method",
            "rtn",
            "--group-size",
            "32",
            "-q",
            str(tiny_model),
            "-o",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(installed_kernels)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    code = (
        "import torch; from compress_export import AutoCompressedModelForCausalLM; "
        f"m = AutoCompressedModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32); "
        "print(sum(type(x).__name__ == 'QuantLinear' for x in m.modules())); "
        "from kernels import CUDAProperties; print(CUDAProperties)"
    )
    r = run_in_checkout(code, installed_kernels)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["14", "hf-kernels"], r.stdout  # 2 decoder layers x 7 linears


def test_the_wheel_builds_without_warnings(tmp_path):
    """`pip wheel .` prints no setuptools warnings (a new user reads them as a broken install) and lays the
    top-level folders out inside the package."""
    import setuptools

    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (74, 1):  # pyproject.toml's build requirement
        pytest.skip(f"setuptools {setuptools.__version__} in this environment is older than the build needs")
    src = tmp_path / "src"  # a copy of the project's own files: the build writes build/ and *.egg-info beside them
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", "*.so", "results", ".pytest_cache"
        ),
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "-w",
            str(tmp_path / "w"),
            "--no-build-isolation",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    noise = [
        ln
        for ln in (r.stdout + r.stderr).splitlines()
        if re.search(r"warn|deprecat|!!", ln, re.I) and "Location '" not in ln
    ]  # pip's index config, not ours
    assert not noise, "\n".join(noise[:20])
    import zipfile

    names = zipfile.ZipFile(next((tmp_path / "w").glob("*.whl"))).namelist()
    for name in TOP_LEVEL:
        assert f"compress_export/{name}/base.py" in names or f"compress_export/{name}/vllm_plugin.py" in names, name
        assert f"compress_export/{name}/__init__.py" not in names  # the checkout-only pointer stays out
    assert not [n for n in names if n.endswith((".c", ".h"))]
