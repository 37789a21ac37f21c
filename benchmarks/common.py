"""Shared measuring and reporting for the benchmark scripts.

Every script compares this library against the baseline a user would otherwise run, in the same
process, on the same inputs, and appends its rows to ``benchmarks/results/<name>.csv`` keyed by
the machine and the library's commit, so that ``python -m benchmarks.plot`` can draw them.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

# CKAAD_FAST_BENCH_RESULTS redirects the CSVs (the test suite's --quick runs write to a temp dir).
RESULTS_DIR = Path(os.environ.get("CKAAD_FAST_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name for CUDA devices, else the CPU model and the thread count torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads{_cpu_flags()})"


def _cpu_flags() -> str:
    """The CPU's vector and matrix extensions that decide the CPU paths' speed (none: '')."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    have = [w for w in wanted if w in flags]
    return "; " + " ".join(have) if have else ""


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def feature_bench_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The options shared by the scripts that time ops on feature tensors (bench_ops, bench_dropin)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds: CI runs this so the script cannot rot")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per row, median reported (default 5)")
    parser.add_argument("--sets", type=int, default=2,
                        help="input sets rotated between repetitions, so caches do not flatter (default 2)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over which the variants alternate, each one's best median kept (default 2; 1 with --quick)")
    parser.add_argument("--no-save", action="store_true", help=f"do not append the rows to benchmarks/results/{name}.csv")
    return parser


def save_rows(name: str, rows: Sequence[dict], args, device: str | torch.device = "cpu") -> None:
    """Append a full run's rows to ``benchmarks/results/<name>.csv``; --quick and --no-save runs keep none."""
    if not args.no_save and not args.quick:
        path = append_results(name, rows, device)
        print(f"\nrows appended to {path}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int, rotate: int) -> list[float]:
    for i in range(warmup):
        fn(i % rotate)
    _sync(device)
    times = []
    for i in range(repeats):
        k = i % rotate
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(k)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(k)
            times.append(time.perf_counter() - t0)
    return times


def median_time(
    fn: Callable[[int], object],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    rotate: int = 1,
) -> float:
    """Median wall time of ``fn(i)`` in seconds, after ``warmup`` calls.

    ``fn`` takes the index of the input set to use (``i % rotate``), so that a script can rotate
    through several input sets and caches do not flatter the result. On CUDA, device events
    bracket each call.
    """
    return statistics.median(_times(fn, torch.device(device), warmup, repeats, rotate))


def best_time(fn: Callable[[int], object], *, device: str | torch.device = "cpu", warmup: int = 1,
              repeats: int = 10, rotate: int = 1) -> float:
    """Shortest wall time of ``fn(i)`` over ``repeats`` calls (arguments as :func:`median_time`):
    what ceilings and floors are measured with, since they are the best a machine does, not its
    typical run on a shared host."""
    return min(_times(fn, torch.device(device), warmup, repeats, rotate))


def best_of_rounds(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Call each timer once per round, the variants alternating, and keep each one's best result.

    On a shared machine a burst from another process can land on whichever variant is running;
    alternating over rounds and keeping the best gives every variant the same chance of a quiet
    run (one noisy run put a loss at 2.5x its usual time before this).
    """
    best = {name: float("inf") for name in timers}
    for _ in range(max(1, rounds)):
        for name, timer in timers.items():
            best[name] = min(best[name], timer())
    return best


def max_abs_diff(a, b) -> float:
    """The largest |a - b| over every element (tensors, arrays or numbers; NaN where either is NaN)."""
    import numpy as np

    a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    b = b.detach().cpu().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    d = np.abs(a - b)
    return float("nan") if np.isnan(d).any() else float(d.max(initial=0.0))


def check_agreement(label: str, diff: float, tol: float) -> float:
    """Refuse to report a speed for a result that differs from its baseline's: exit with an error
    when ``diff`` (a max abs difference) is above ``tol`` or NaN; print one ``check:`` line."""
    if not diff <= tol:
        raise SystemExit(f"check FAILED: {label}: max abs diff {diff:.3e} > {tol:.1e}; not timing a wrong result")
    print(f"check: {label}: max abs diff {diff:.3e} <= {tol:.1e}", flush=True)
    return diff


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Print rows as a Markdown table (so it can be pasted into the README) and return it."""
    rows = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in rows)) if rows else len(str(c)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
    text = f"\n{title}\n" + "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.3e}"
    return str(v)


def append_results(name: str, rows: Sequence[dict], device: str | torch.device = "cpu") -> Path:
    """Append ``rows`` to ``benchmarks/results/<name>.csv`` with machine, commit and date.

    The file is rewritten through a temporary file and an atomic rename, so that an interrupted
    run never leaves a half-written CSV behind.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    stamp = {
        "machine": machine_name(device),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
    }
    new_rows = [{**stamp, **row} for row in rows]
    old_rows: list[dict] = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            old_rows = list(csv.DictReader(f))
    fields: list[str] = []
    for row in old_rows + new_rows:
        for k in row:
            if k not in fields:
                fields.append(k)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in old_rows + new_rows:
            writer.writerow(row)
    os.replace(tmp, path)
    return path


def memory_floor(sets: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]], *,
                 device: str | torch.device = "cpu", repeats: int = 5) -> float:
    """Seconds to read every tensor of ``reads`` once and write every tensor of ``writes`` once,
    for ``(reads, writes)`` pairs in ``sets`` rotated between repetitions: the least time any
    implementation of a memory-bound op on them can take, measured on the same machine."""
    # A sum reads each byte once (its result is tiny); a fill writes each byte once.
    return best_time(
        lambda i: ([t.sum() for t in sets[i][0]], [t.zero_() for t in sets[i][1]]),
        device=device, warmup=2, repeats=repeats, rotate=len(sets),
    )


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """MiB that one call of ``fn`` needs at its peak beyond what was in use before it, as
    Liger-Kernel's benchmarks report it: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU
    the growth of the process's peak resident set (Linux: freed memory is handed back with glibc's
    malloc_trim and the high-water mark reset through /proc/self/clear_refs first); what the
    allocator keeps cached between calls still escapes it, so it is a floor of the true peak.
    NaN where it cannot be measured."""
    device = torch.device(device)
    fn()  # warm: caches, lazily built matrices and compiled code are not the op's memory
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _malloc_trim()  # hand freed memory back, so that what the call allocates shows in the resident set
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        rss0 = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
        del out
    except OSError:
        return float("nan")
    return max(peak - rss0, 0) / 1024


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def matmul_ceiling(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, quick: bool = False) -> float:
    """FLOP/s of a large square matmul on ``device``: the compute ceiling that rows of
    compute-bound work (a network's forward) are compared with. bf16 on CUDA, float32 elsewhere.
    ``quick``: a 256-wide product, for the scripts' --quick runs (a CPU without bfloat16 matrix
    units emulates a 2048-wide bfloat16 product in minutes; the number is then only a smoke test)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 256 if quick else (8192 if device.type == "cuda" else 2048)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t = best_time(lambda i: a @ b, device=device, warmup=2, repeats=10)
    return 2 * n**3 / t


def count_flops(fn, *args) -> int:
    """FLOPs of one call of ``fn(*args)`` (matmuls and convolutions), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()
