"""The README's drop-in examples run as written and report the same results before and after."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: see conftest.py

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*_swap.py")))
def test_example_runs_and_matches(script):
    proc = subprocess.run([sys.executable, f"examples/{script}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = [float(d) for d in re.findall(r"max abs (?:grad )?diff ([0-9.e+-]+)", proc.stdout)]
    assert diffs and max(diffs) < 1e-4, proc.stdout
