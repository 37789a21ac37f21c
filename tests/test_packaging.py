"""The wheel a user installs: metadata, contents, and that installing it never replaces torch."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import ckaad_fast

pytestmark = pytest.mark.slow  # builds a wheel in a subprocess: see conftest.py

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (whl,) = out.glob("ckaad_fast-*.whl")
    return whl


def _metadata(whl: Path):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode()), z.namelist()


def test_metadata_has_ranges_not_pins_and_says_who_and_what(wheel):
    meta, _ = _metadata(wheel)
    assert meta["Version"] == ckaad_fast.__version__
    assert meta["Requires-Python"] and meta["Summary"] and meta["License-Expression"] == "MIT"
    assert meta.get_all("Project-URL") and meta["Author"]
    requires = meta.get_all("Requires-Dist")
    for pkg in ("torch", "torchvision", "triton"):
        for r in requires:
            if re.match(rf"{pkg}\b", r) and not r.startswith(f"{pkg}-"):
                assert "==" not in r, r  # never an exact pin: it would replace the user's torch
    torch_req = next(r for r in requires if re.match(r"torch\b[^v]", r))
    assert ">=2.11" in torch_req and "<3" in torch_req


def test_the_wheel_holds_the_kernels_and_every_subpackage(wheel):
    _, names = _metadata(wheel)
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "ckaad_fast").rglob("__init__.py")}
    for pkg in packages:
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg
    for kernel in [*(ROOT / "kernels").glob("*.py"), *(ROOT / "kernels").glob("*.c")]:  # .c: built on first use
        assert f"ckaad_fast/kernels/{kernel.name}" in names, kernel.name
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)


def test_installing_the_wheel_keeps_the_installed_torch(wheel, tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert planned == {"ckaad-fast"} or planned == {"ckaad_fast"}, planned


def test_a_bare_checkout_imports_its_kernels():
    """From a checkout that is not installed (``python -S``: no site-packages, so no editable
    finder), ``ckaad_fast.kernels`` is the top-level ``kernels/`` folder, as an install maps it:
    the GPU check runs from such a checkout even when an editable install failed."""
    root = ROOT
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ckaad_fast.kernels as k; "
            "print(k.__file__); print(k.__name__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path, name = out.stdout.split()
    assert Path(path) == root / "kernels" / "__init__.py" and name == "ckaad_fast.kernels"
