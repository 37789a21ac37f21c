"""Every Triton kernel compiles for an sm_90 GPU (H100/H200) without spilling, checked on this
GPU-less machine with the ptxas inside Triton's wheel (tests/gpu_compile.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: see conftest.py

ROOT = Path(__file__).resolve().parent.parent


def _run(args, cwd=ROOT):
    # Compiling needs the real JIT functions: no interpreter in the child process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_kernel_compiles_for_sm90_without_spills():
    proc = _run(["tests/gpu_compile.py", "--quick", "--arch", "90"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed, 0 spill" in proc.stdout
    for kernel in ("_cosine_map_fwd_kernel", "_cosine_map_bwd_kernel", "_flat_cosine_partials_kernel",
                   "_flat_cosine_bwd_kernel", "_energy_partials_kernel", "_energy_bwd_kernel", "_upsample_blur_kernel"):
        assert f"| {kernel} |" in proc.stdout, kernel


def test_the_check_fails_a_kernel_that_only_the_interpreter_accepts(tmp_path):
    # A loop-carried value that changes type (int -> float) runs in the interpreter, which follows
    # Python, and is refused by the compiler: the compile check must see the difference.
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent('''
        import os, sys
        import torch, triton, triton.language as tl

        @triton.jit
        def bad(X, OUT, N, B: tl.constexpr):
            acc = 0
            for i in range(0, N, B):
                acc += tl.sum(tl.load(X + i + tl.arange(0, B)), axis=0)
            tl.store(OUT, acc)

        x, out = torch.ones(32), torch.zeros(1)
        if os.environ.get("TRITON_INTERPRET") == "1":
            bad[(1,)](x, out, 32, B=16)
            print("interpreter:", out.item())
        else:
            sys.path.insert(0, sys.argv[1])
            from gpu_compile import to_source
            from triton.backends.compiler import GPUTarget
            src, options, _ = to_source(bad, (x, out, 32), {"B": 16, "num_warps": 2})
            print("signature:", src.signature, "options:", options)
            try:
                triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
                print("compiled")
            except Exception as e:
                print("refused:", type(e).__name__)
    '''))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    interp = subprocess.run([sys.executable, "bad_kernel.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "interpreter: 32.0" in interp.stdout, interp.stdout + interp.stderr
    proc = _run([str(tmp_path / "bad_kernel.py"), str(ROOT / "tests")], cwd=tmp_path)
    assert "refused:" in proc.stdout, proc.stdout + proc.stderr
    # Triton's own specialisation rules: pointers typed, a multiple of 16 stays an i32 argument.
    assert "'X': '*fp32'" in proc.stdout and "'N': 'i32'" in proc.stdout and "'B': 'constexpr'" in proc.stdout
    assert "options: {'num_warps': 2}" in proc.stdout
