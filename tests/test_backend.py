"""Without importable kernels the library says so once, keeps the CPU paths, and refuses CUDA
tensors on backend 'auto' instead of running the CPU path's code on the GPU."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses: see conftest.py

SCRIPT = r"""
import sys, types, warnings
sys.modules["triton"] = None  # `import triton` now raises ImportError, as a broken install does
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import ckaad_fast.ops as ops
    import ckaad_fast.ops  # a second import says nothing more
    from ckaad_fast.ops import _backend
said = [str(w.message) for w in caught if "kernels cannot be imported" in str(w.message)]
print("WARNINGS", len(said), said[0] if said else "")
a = torch.rand(1, 3, 4, 4)
print("CPU", float(ops.cosine_error_map(a, a + 1).sum()) >= 0)
fake_cuda = types.SimpleNamespace(device=torch.device("cuda"))
try:
    _backend.use_triton(fake_cuda)
    print("CUDA no error")
except RuntimeError as e:
    print("CUDA", e)
with ops.backend("torch"):
    print("TORCH", _backend.use_triton(fake_cuda))
"""


@pytest.fixture(scope="module")
def output():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_missing_kernels_are_reported_once_with_the_import_error(output):
    line = next(l for l in output.splitlines() if l.startswith("WARNINGS"))
    assert line.startswith("WARNINGS 1 ")
    assert "ImportError" in line or "ModuleNotFoundError" in line


def test_cpu_tensors_still_take_the_pytorch_path(output):
    assert "CPU True" in output


def test_cuda_tensors_on_auto_raise_a_clear_error(output):
    line = next(l for l in output.splitlines() if l.startswith("CUDA"))
    assert "cannot be imported" in line and "CKAAD_FAST_BACKEND=torch" in line


def test_backend_torch_runs_the_pytorch_path_on_purpose(output):
    assert "TORCH False" in output
