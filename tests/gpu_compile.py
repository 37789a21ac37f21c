"""Compile every Triton kernel for a real GPU target on a machine without a GPU.

Triton's interpreter (what the rest of the suite runs) checks what a kernel computes, not whether
it compiles: block shapes that ``tl.dot`` refuses, dtype mismatches, or a tile so large that it
spills registers only show up on a GPU. Triton's wheel carries ptxas, so the whole pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) runs here for any NVIDIA target.

The launchers in ``ckaad_fast.kernels`` are called on CPU tensors with each kernel swapped for a
recorder, so the kernels are compiled with exactly the arguments, constexprs and specialisations
(Triton's own rules: ints equal to 1 become constants, multiples of 16 and aligned pointers are
marked divisible) that those launchers give them at realistic and odd shapes. The cuobjdump in the
same wheel then reads each cubin's registers, local memory (spills) and shared memory.

    python tests/gpu_compile.py                # sm_90 (H100/H200), the full set of shapes
    python tests/gpu_compile.py --arch 80 --quick

Exit status 1 when a kernel fails to compile or spills.
"""
from __future__ import annotations

import os

# The kernels must be real JIT functions, not the interpreter's wrappers: set before importing them.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

from ckaad_fast.kernels import cosine as kcos  # noqa: E402
from ckaad_fast.kernels import energy as kenergy  # noqa: E402
from ckaad_fast.kernels import upsample_blur as kub  # noqa: E402
from ckaad_fast.ops.scoring import _axis_matrix  # noqa: E402

MODULES = (kcos, kenergy, kub)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn: JITFunction, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


def record_launches(run) -> list:
    """The (kernel, grid, args, kwargs) of every launch ``run()`` makes through the launchers."""
    launches: list = []
    saved = {}
    for mod in MODULES:
        for name, value in vars(mod).items():
            # Only launched kernels are swapped; @triton.jit helpers they call stay as they are.
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                saved[(mod, name)] = value
                setattr(mod, name, _Recorder(value, launches))
    try:
        run()
    finally:
        for (mod, name), value in saved.items():
            setattr(mod, name, value)
    return launches


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def to_source(fn: JITFunction, args, kwargs) -> tuple[ASTSource, dict, str]:
    """An ASTSource specialised as the JIT would for these arguments, the launch options (warps,
    stages) the launcher asked for, and a short description."""
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    signature, constexprs, attrs, desc = {}, {}, {}, []
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = v
            desc.append(f"{name}={getattr(v, 'name', v)}")
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[name] = spec
        elif spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
        if isinstance(v, torch.Tensor) and not desc:
            desc.append(str(v.dtype).replace("torch.", ""))
    return ASTSource(fn, signature, constexprs, attrs), options, " ".join(desc)


def resource_usage(cubin: bytes, cuobjdump: Path) -> dict:
    """Registers, local memory (spills) and shared memory of a cubin, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else -1
    return usage


# --------------------------------------------------------------------------------------------
# The launches to compile: what the ops run at the shapes users have
# --------------------------------------------------------------------------------------------
def _cases(quick: bool):
    """(description, callable) pairs, each calling launchers with CPU tensors of one case."""
    # WideResNet50 layers 1-3 at 256 px, batch 16 (RD4AD, CKAAD), and an odd small shape.
    maps = [(16, 256, 64, 64), (16, 1024, 16, 16), (3, 37, 17, 29)]
    if quick:
        maps = [(16, 256, 64, 64), (3, 37, 17, 29)]
    cases = []
    for dtype in DTYPES:
        for shape in maps:
            for layout in ("contiguous", "channels_last"):
                def cosine_map(shape=shape, dtype=dtype, layout=layout):
                    a = torch.empty(shape, dtype=dtype)
                    if layout == "channels_last":
                        a = a.contiguous(memory_format=torch.channels_last)
                    b = torch.empty_like(a)
                    err, stats = kcos.cosine_map_forward(a, b, 1e-8, torch.float32)
                    kcos.cosine_map_backward(a, b, err, stats, 1e-8)
                cases.append((f"cosine map {shape} {layout}", cosine_map))

        def flat_cosine(dtype=dtype):
            a, b = torch.empty(16, 256 * 64 * 64, dtype=dtype), torch.empty(16, 256 * 64 * 64, dtype=dtype)
            coef = torch.empty(16, 3)
            kcos.flat_cosine_sums(a, b)
            kcos.flat_cosine_backward(a, b, coef)
            kcos.flat_cosine_backward(a, b, coef, need_a=False)
        cases.append(("flat cosine", flat_cosine))

        def energy(dtype=dtype):
            s = torch.empty(32 * 64 * 64 + 13, dtype=dtype)
            for high in (False, True):
                kenergy.energy_sum(s, 5.0, high)
                kenergy.energy_backward(s, torch.empty(()), 5.0, high)
        cases.append(("energy", energy))

    sizes = [((64, 64), (256, 256)), ((16, 16), (256, 256)), ((17, 9), (97, 131))]
    for (h, w), (oh, ow) in sizes[:2] if quick else sizes:
        def upsample(h=h, w=w, oh=oh, ow=ow):
            m = torch.empty(16, h, w)
            r = _axis_matrix(h, oh, 4.0, 4.0, "reflect", torch.device("cpu"), torch.float32, False)
            ct = _axis_matrix(w, ow, 4.0, 4.0, "reflect", torch.device("cpu"), torch.float32, True)
            kub.upsample_blur_sum([m, m], [r, r], [ct, ct], oh, ow)
        cases.append((f"upsample+blur {h}x{w}->{oh}x{ow}", upsample))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for, e.g. 80, 90 (default 90)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (what the test suite runs)")
    args = parser.parse_args(argv)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    target = GPUTarget("cuda", args.arch, 32)

    compiled: dict = {}
    failures = spills = 0
    rows = []
    for case, run in _cases(args.quick):
        for fn, grid, a, kw in record_launches(run):
            src, options, desc = to_source(fn, a, kw)
            key = (fn.__name__, repr(src.signature), repr(sorted(map(str, src.constants.items()))), repr(src.attrs),
                   repr(options))
            if key in compiled:
                continue
            try:
                kernel = triton.compile(src, target=target, options=options)
                usage = resource_usage(kernel.asm["cubin"], bin_dir / "cuobjdump")
                verdict = "ok"
                if usage["LOCAL"] > 0:
                    verdict, spills = "SPILLS", spills + 1
                rows.append((case, fn.__name__, desc, kernel.metadata.num_warps, usage["REG"], usage["LOCAL"],
                             usage["SHARED"], verdict))
            except Exception as e:  # noqa: BLE001 - reported in the table, counted as a failure
                failures += 1
                rows.append((case, fn.__name__, desc, "-", "-", "-", "-", f"FAILED: {type(e).__name__}: {str(e)[:200]}"))
            compiled[key] = True
            print(" ".join(map(str, rows[-1])), flush=True)

    print(f"\nTriton {triton.__version__}, target sm_{args.arch}: {len(rows)} specialisations")
    print("| first case | kernel | specialisation | warps | registers | local (spill) bytes | shared bytes | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    print(f"\n{failures} failed, {spills} spill")
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
