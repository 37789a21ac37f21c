"""Everything a GPU can tell, in one call of at most 8 minutes, and an exit status that says it.

On a CUDA machine, in one process, in sections (``--only SECTION`` reruns one):
  kernels    every Triton kernel against its float64 reference at the Scorer's and training's
             shapes and at odd sizes, fp32/fp16/bf16, forward and backward, outputs written into
             NaN-guarded buffers; normwise bounds from the arithmetic (gpu_criteria.py)
  compile    torch.compile(fullgraph=True) of the scoring forward and of a training step, whose
             weight gradients are asserted against float64 (TF32 off)
  graphs     the Scorer under compile + CUDA graphs equals eager; a short batch is padded through
             the same graph; zero cudagraph skips
  decisions  a calibration's promise kept by the Scorer's default precision; the exported graph,
             whole (pixels in, scores and maps out), against the Scorer (TF32 off)
  ops        each op against its plain formula, eager and under torch.compile (best of default and
             max-autotune), at batch 128/256 (channels_last, bf16/fp16/fp32), training's batch
             16/32 forward + backward, and batch 16 replayed under CUDA graphs; % of copy bandwidth
  scorer     the Scorer (wide_resnet50_2/256, bf16, compile + CUDA graphs) against a plain PyTorch
             scorer with the same networks under compile + CUDA graphs, and the networks alone
  training   the step with the fused losses against eager losses, and the losses alone
  tiling     tiled scoring in megapixels/s
  profile    a torch.profiler trace of one Scorer batch with the library's ranges; the head's
             share of GPU time (scorer_trace.json.gz)
  nvtx       NVTX ranges emitted
Every row has a criterion: a bound, or a goal of issue #32 (gpu_speed.py). A FAIL, a MISS, or a
row the time budget left unmeasured makes the exit status 1. Rows go to gpu_check.csv and
gpu_timings.csv under --out (default $OUT) as each completes, so a timeout still returns data.

``python benchmarks/gpu_check.py --cpu-smoke`` runs the same code at tiny sizes on the CPU, kernels
in Triton's interpreter (the test suite runs it; goals there read NOGOAL). On the GPU machine:

    pip install --no-deps --no-build-isolation -e . && python benchmarks/gpu_check.py
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:
    # Must precede the first import of the kernels (docs/ARCHITECTURE.md, section Triton's interpreter).
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CKAAD_FAST_BACKEND"] = "triton"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ckaad_fast.ops as ops  # noqa: E402
from benchmarks import gpu_speed  # noqa: E402
from benchmarks.gpu_whole import check_compile_and_graphs, check_decisions, profile_scorer  # noqa: E402
from benchmarks.gpu_criteria import (bound, check_close, exit_status, goal_verdict, gradient_condition,  # noqa: E402
                                     map_condition)
from ckaad_fast.kernels import cosine as kcos  # noqa: E402
from ckaad_fast.kernels import energy as kenergy  # noqa: E402
from ckaad_fast.kernels import upsample_blur as kub  # noqa: E402
from ckaad_fast.ops import reference as ref  # noqa: E402
from ckaad_fast.ops.scoring import _axis_matrix  # noqa: E402

SECTIONS = ("kernels", "compile", "graphs", "decisions", "ops", "scorer", "training", "tiling", "profile", "nvtx")
FIELDS = ["section", "check", "verdict", "detail", "seconds"]


class Check:
    """Collects verdict rows, streams them to the CSVs and the log; a failing check never stops
    the others. ``deadline``: past it, :meth:`out_of_time` records a MISS instead of measuring."""

    def __init__(self, out_dir: Path | None, smoke: bool, deadline: float):
        self.rows: list[dict] = []
        self.smoke, self.deadline = smoke, deadline
        self.out_dir = out_dir
        self.log = open(out_dir / "gpu_check.log", "w", encoding="utf-8") if out_dir else None
        self._timing_fields: list[str] = []
        if out_dir:
            with open(out_dir / "gpu_check.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(FIELDS)

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        if self.log:
            self.log.write(msg + "\n")
            self.log.flush()

    def _append(self, row: dict) -> None:
        self.rows.append(row)
        self.say(f"[{row['verdict']}] {row['section']} / {row['check']} {row['detail']}")
        if self.out_dir:
            with open(self.out_dir / "gpu_check.csv", "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore").writerow(row)

    @contextlib.contextmanager
    def item(self, section: str, name: str):
        t0 = time.perf_counter()
        row = {"section": section, "check": name, "verdict": "PASS", "detail": ""}
        try:
            yield row
        except Exception as e:  # noqa: BLE001 - the verdict table records it
            row["verdict"] = "FAIL"
            row["detail"] = f"{type(e).__name__}: {str(e)[:300]}"
            self.say(traceback.format_exc())
        row["seconds"] = f"{time.perf_counter() - t0:.2f}"
        self._append(row)

    def goal(self, value: float, target: float, at_least: bool = True) -> str:
        """A goal's verdict; on the CPU smoke run goals do not apply (NOGOAL)."""
        return "NOGOAL" if self.smoke else goal_verdict(value, target, at_least)

    def out_of_time(self, section: str, name: str) -> bool:
        if time.perf_counter() <= self.deadline:
            return False
        self._append({"section": section, "check": name, "verdict": "MISS", "seconds": "0",
                      "detail": "not measured: the time budget was spent (rerun with --only " + section + ")"})
        return True

    def csv(self, row: dict) -> None:
        """One timing row, appended to gpu_timings.csv at once (the header grows as fields appear)."""
        if not self.out_dir:
            return
        path = self.out_dir / "gpu_timings.csv"
        new = [k for k in row if k not in self._timing_fields]
        if new:  # rewrite with the wider header (rows are few)
            old = list(csv.DictReader(open(path, encoding="utf-8"))) if path.exists() else []
            self._timing_fields += new
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self._timing_fields, restval="")
                w.writeheader()
                w.writerows(old)
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self._timing_fields, restval="").writerow(row)


def _guarded(shape, dtype, device, guard=256):
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype, device=device)
    return buf, buf[guard:guard + n].view(shape)


def _check_guards(buf, what, guard=256):
    if not (torch.isnan(buf[:guard]).all() and torch.isnan(buf[-guard:]).all()):
        raise AssertionError(f"{what}: write outside the output")
    if torch.isnan(buf[guard:-guard]).any():
        raise AssertionError(f"{what}: output element left unwritten")


# ------------------------------------------------------------------------------------------------
# kernels: against their float64 references
# ------------------------------------------------------------------------------------------------
MAP_SHAPES = [(128, 256, 64, 64), (32, 256, 64, 64), (32, 1024, 16, 16), (3, 37, 17, 29), (1, 1, 1, 1)]
LOSS_SHAPES = [(32, 256, 64, 64), (5, 1, 17, 3)]
ENERGY_SIZE = 32 * 64 * 64 + 13
SMOKE_MAP_SHAPES, SMOKE_LOSS_SHAPES = [(2, 7, 5, 9), (1, 33, 3, 3)], [(2, 3, 5, 7)]


def cosine_map_case(shape, dtype, device, channels_last: bool, g):
    """Inputs, kernel outputs (NaN-guarded) and float64 references of one cosine-map case:
    ``(outputs, references, bounds)``, each a dict over 'map', 'grad a', 'grad b'."""
    a = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    b = (a.float() + 0.3 * torch.randn(shape, generator=g).to(device)).to(dtype)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    N, C, H, W = shape
    err_buf, err = _guarded((N, H, W), torch.float32, device)
    st_buf, stats = _guarded((3, N, H, W), torch.float32, device)
    kcos.cosine_map_forward(a, b, 1e-8, torch.float32, err=err, stats=stats)
    _check_guards(err_buf, "error map")
    _check_guards(st_buf, "stats")
    gout = torch.randn((N, H, W), generator=g).to(device)
    ga_buf, ga = _guarded(tuple(a.shape), dtype, device)
    gb_buf, gb = _guarded(tuple(b.shape), dtype, device)
    kcos.cosine_map_backward(a, b, gout, stats, 1e-8, grad_a=ga, grad_b=gb)
    _check_guards(ga_buf, "grad a")
    _check_guards(gb_buf, "grad b")
    a64, b64 = a.double().requires_grad_(True), b.double().requires_grad_(True)
    r = ref.cosine_error_map(a64, b64)
    ra, rb = torch.autograd.grad(r, (a64, b64), gout.double())
    cos = 1 - r.detach()
    bounds = {"map": bound(torch.float32, C, map_condition(cos)), "grad a": bound(dtype, C, gradient_condition(cos)),
              "grad b": bound(dtype, C, gradient_condition(cos))}
    return {"map": err, "grad a": ga, "grad b": gb}, {"map": r.detach(), "grad a": ra, "grad b": rb}, bounds


def reconstruction_case(shape, dtype, device, g):
    """The fused loss and its gradients against float64: ``(outputs, references, bounds)``."""
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    y = (x.detach().float() + 0.3 * torch.randn(shape, generator=g).to(device)).to(dtype).requires_grad_(True)
    loss = ops.cosine_reconstruction_loss([x], [y])
    gx, gy = torch.autograd.grad(loss, (x, y))
    x64, y64 = x.detach().double().requires_grad_(True), y.detach().double().requires_grad_(True)
    rl = ref.cosine_reconstruction_loss([x64], [y64])
    rx, ry = torch.autograd.grad(rl, (x64, y64))
    k = x[0].numel()
    cos = torch.nn.functional.cosine_similarity(x64.detach().reshape(shape[0], -1), y64.detach().reshape(shape[0], -1))
    bounds = {"loss": bound(torch.float32, k, map_condition(cos)), "grad inputs": bound(dtype, k, gradient_condition(cos)),
              "grad outputs": bound(dtype, k, gradient_condition(cos))}
    return ({"loss": loss.reshape(1), "grad inputs": gx, "grad outputs": gy},
            {"loss": rl.reshape(1).detach(), "grad inputs": rx, "grad outputs": ry}, bounds)


def energy_case(n, high: bool, dtype, device, g):
    s = (6 * torch.randn(n, generator=g)).to(device=device, dtype=dtype)
    total = kenergy.energy_sum(s, 5.0, high)
    buf, grad = _guarded((n,), dtype, device)
    kenergy.energy_backward(s, torch.tensor(0.5, device=device), 5.0, high, grad=grad)
    _check_guards(buf, "energy grad")
    s64 = s.double().requires_grad_(True)
    rl = ref.energy_hinge_loss(s64, high) * n
    (rg,) = torch.autograd.grad(rl, s64, torch.tensor(0.5, dtype=torch.float64, device=device))
    # The sum accumulates n terms; the gradient is sign times a scale: one rounding.
    return ({"sum": total.reshape(1), "grad": grad}, {"sum": rl.reshape(1).detach(), "grad": rg},
            {"sum": bound(torch.float32, n), "grad": bound(dtype, 1)})


def _compare_all(outs, refs, bounds) -> str:
    return "; ".join(f"{k} {check_close(outs[k], refs[k], bounds[k], k)}" for k in outs)


def check_kernels(chk: Check, device, smoke: bool):
    dtypes = [torch.float32, torch.float16] if smoke else [torch.float32, torch.float16, torch.bfloat16]
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in dtypes:
        for shape in (SMOKE_MAP_SHAPES if smoke else MAP_SHAPES):
            for layout in ("contiguous", "channels_last"):
                with chk.item("kernels", f"cosine map fwd+bwd {tuple(shape)} {dtype} {layout}") as row:
                    row["detail"] = _compare_all(*cosine_map_case(shape, dtype, device, layout == "channels_last", g))
        for shape in (SMOKE_LOSS_SHAPES if smoke else LOSS_SHAPES):
            with chk.item("kernels", f"reconstruction loss fwd+bwd {shape} {dtype}") as row:
                row["detail"] = _compare_all(*reconstruction_case(shape, dtype, device, g))
        for high in (False, True):
            with chk.item("kernels", f"energy loss fwd+bwd high={high} {dtype}") as row:
                row["detail"] = _compare_all(*energy_case(1000 if smoke else ENERGY_SIZE, high, dtype, device, g))

    sizes = [((5, 7), (3, 3), (37, 19))] if smoke else [((64, 64), (32, 32), (256, 256)), ((16, 16), (8, 8), (224, 224)), ((17, 9), (5, 3), (97, 131))]
    for (h1, w1), (h2, w2), (oh, ow) in sizes:
        for border in ("reflect", "mirror"):
            with chk.item("kernels", f"upsample+blur {h1}x{w1}+{h2}x{w2}->{oh}x{ow} {border}") as row:
                maps = [torch.rand(4, h1, w1, generator=g).to(device), torch.rand(4, h2, w2, generator=g).to(device)]
                rows_m = [_axis_matrix(m.shape[1], oh, 4.0, 4.0, border, torch.device(device), torch.float32, False) for m in maps]
                cols_t = [_axis_matrix(m.shape[2], ow, 4.0, 4.0, border, torch.device(device), torch.float32, True) for m in maps]
                buf, out = _guarded((4, oh, ow), torch.float32, device)
                kub.upsample_blur_sum(maps, rows_m, cols_t, oh, ow, out=out)
                _check_guards(buf, "anomaly map")
                r = sum(rm.double() @ m.double() @ ct.double() for rm, m, ct in zip(rows_m, maps, cols_t))
                # Non-negative weights and maps: no cancellation; the sums run over h + w taps.
                row["detail"] = check_close(out, r, bound(torch.float32, h1 + w1 + h2 + w2), "upsample+blur")

    with chk.item("kernels", "anomaly_map vs scipy pipeline (reflect and mirror)") as row:
        shapes = [(2, 8, 8, 8), (2, 16, 4, 4)] if smoke else [(4, 256, 64, 64), (4, 512, 32, 32), (4, 1024, 16, 16)]
        fs = [torch.randn(s, generator=g).to(device) for s in shapes]
        ft = [f + 0.3 * torch.randn(f.shape, generator=g).to(device) for f in fs]
        out_size = 32 if smoke else 256
        kappa = max(map_condition(1 - ref.cosine_error_map(f.double(), t.double())) for f, t in zip(fs, ft))
        limit = bound(torch.float32, max(s[1] for s in shapes), kappa)
        row["detail"] = ", ".join(
            f"{border} " + check_close(ops.anomaly_map(fs, ft, out_size=out_size, border=border),
                                       ref.anomaly_map(fs, ft, out_size=out_size, border=border), limit, border)
            for border in ("reflect", "mirror"))



# ------------------------------------------------------------------------------------------------
# nvtx
# ------------------------------------------------------------------------------------------------
def check_nvtx(chk: Check, device, smoke: bool):
    from ckaad_fast.profiling import enable_nvtx, nvtx_backend, nvtx_enabled, nvtx_range

    with chk.item("nvtx", "ranges emitted without error") as row:
        enable_nvtx(True)
        try:
            if not nvtx_enabled():
                row["verdict"] = "FAIL" if device.type == "cuda" else "NOGOAL"
                row["detail"] = "neither the nvtx package nor torch's CUDA NVTX bindings are here"
                return
            with nvtx_range("gpu_check"):
                fs = [torch.randn(2, 4, 8, 8, device=device)]
                ops.anomaly_map(fs, fs, out_size=16)
            row["detail"] = f"through {nvtx_backend()}"
        finally:
            enable_nvtx(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description="One prepared GPU check: correctness, compile, CUDA graphs, "
                                                 "timings against the plain formulas, a profile, NVTX.")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU, kernels in Triton's interpreter (for the test suite)")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for gpu_check.log, gpu_check.csv, gpu_timings.csv and the trace (default: $OUT)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to skip")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds after which rows not yet measured are recorded as MISS (default 450)")
    parser.add_argument("--max-autotune", action=argparse.BooleanOptionalAction, default=True,
                        help="also compile the plain formulas with mode='max-autotune-no-cudagraphs' (default on; "
                             "the best of the two is the baseline)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    device = torch.device("cpu" if smoke else "cuda")
    warnings.simplefilter("ignore")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chk = Check(out_dir, smoke, t0 + args.budget)
    chk.say(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter smoke run)'}, "
            f"torch {torch.__version__}")
    wanted = [s for s in (args.only or SECTIONS) if s not in args.skip]
    # The models' PyTorch paths on the smoke run: whole networks through the interpreter would
    # only measure the interpreter (the kernels are checked on their own in 'kernels').
    torch_paths = (lambda: ops.backend("torch")) if smoke else contextlib.nullcontext
    modes = ("default", "max-autotune-no-cudagraphs") if args.max_autotune and not smoke else ("default",)
    runs = {
        "kernels": lambda: check_kernels(chk, device, smoke),
        "compile": lambda: check_compile_and_graphs(chk, device, smoke, graphs=False),
        "graphs": lambda: check_compile_and_graphs(chk, device, smoke, graphs=True),
        "decisions": lambda: check_decisions(chk, device, smoke),
        "ops": lambda: gpu_speed.time_ops(chk, device, smoke, modes),
        "scorer": lambda: gpu_speed.time_scorer(chk, device, smoke),
        "training": lambda: gpu_speed.time_training(chk, device, smoke),
        "tiling": lambda: gpu_speed.time_tiling(chk, device, smoke),
        "profile": lambda: profile_scorer(chk, device, smoke, out_dir),
        "nvtx": lambda: check_nvtx(chk, device, smoke),
    }
    for section in wanted:
        if section != "kernels" and section != "ops" and chk.out_of_time(section, "(whole section)"):
            continue
        with (torch_paths() if section not in ("kernels", "ops") else contextlib.nullcontext()):
            runs[section]()
    chk.say(f"\ntotal {time.perf_counter() - t0:.1f} s\n")
    width = max((len(r["section"] + r["check"]) for r in chk.rows), default=10) + 3
    chk.say("| verdict | check" + " " * (width - 5) + " | detail |")
    for r in chk.rows:
        chk.say(f"| {r['verdict']:7} | {r['section']} / {r['check']:{width - len(r['section']) - 3}} | {r['detail']} |")
    status = exit_status(chk.rows)
    chk.say(f"\nexit status {status}: " + ("every row met its criterion" if status == 0 else
                                            "a row failed or missed its goal (see FAIL / MISS above)"))
    if chk.log:
        chk.log.close()
    return status


__all__ = ["main", "Check", "cosine_map_case", "reconstruction_case", "energy_case", "MAP_SHAPES", "LOSS_SHAPES",
           "ENERGY_SIZE"]

if __name__ == "__main__":
    sys.exit(main())
