"""The package as users install it without our scripts: `python -m build` makes an sdist and a wheel (the wheel
built from the sdist, so the sdist is complete), the wheel carries the compiled CPU kernels, and installed into a
fresh venv `compress-export list` runs from it, also with the compiled kernel removed (the portable fallback)."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, cwd, timeout=900):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{(r.stderr or r.stdout)[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # from outside the checkout: its build/ folder (setuptools' scratch space) would shadow the `build` package;
    # --no-isolation: this venv's setuptools, no download
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=out)
    return out


def test_sdist_and_wheel_with_the_compiled_kernels(dist):
    (sdist,) = dist.glob("compress_export-*.tar.gz")
    (wheel,) = dist.glob("compress_export-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("compress_export/kernels/_cpu") and n.endswith(".so") for n in names), names
    for needed in (
        "compress_export/formats/gguf.py",
        "compress_export/integrations/vllm_plugin.py",
        "compress_export/data/calibration.txt",
    ):
        assert needed in names
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "vllm.general_plugins" in text and "compress-export = compress_export.cli.main:main" in text
    assert sdist.stat().st_size > 0


def test_the_wheel_runs_from_a_fresh_venv_with_and_without_its_kernels(dist, tmp_path):
    (wheel,) = dist.glob("compress_export-*.whl")
    venv = tmp_path / "v"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    site = Path(
        run(
            venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    # the dependencies (torch, transformers, …) from this test run's environment, read-only; the package itself
    # only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    where = run(venv / "bin" / "python", "-c", "import compress_export; print(compress_export.__file__)", cwd=tmp_path)
    assert where.startswith(str(site)), where
    out = run(venv / "bin" / "compress-export", "list", cwd=tmp_path)
    assert "gguf" in out and "cpu-wna16 path not built" not in out, out
    for so in (site / "compress_export" / "kernels").glob("_cpu*.so"):
        so.unlink()
    out = run(venv / "bin" / "compress-export", "list", cwd=tmp_path)
    assert "cpu-wna16 path not built" in out and "torch-dequant" in out, out
