"""Every benchmark script runs in its --quick mode, and the GPU check in its --cpu-smoke mode, so
that none of them can rot before a GPU is lent. Nothing here is timed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: see conftest.py

ROOT = Path(__file__).resolve().parent.parent
QUICK_SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def _run(args, tmp_path):
    # Quick runs must not add rows to the committed results.
    env = {**os.environ, "OUT": str(tmp_path), "CKAAD_FAST_BENCH_RESULTS": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# Scripts that time this library against a baseline computing the same thing: before timing, each
# checks that the results agree (benchmarks.common.check_agreement exits non-zero when not).
CHECKED = {"bench_ops": 3, "bench_dropin": 4, "bench_scoring": 4, "bench_train_step": 1, "bench_metrics": 3}


@pytest.mark.parametrize("script", QUICK_SCRIPTS)
def test_benchmark_quick_mode_runs(script, tmp_path):
    out = _run(["-m", f"benchmarks.{script}", "--quick"], tmp_path)
    assert "|" in out  # printed its table
    checks = [line for line in out.splitlines() if line.startswith("check: ")]
    assert len(checks) >= CHECKED.get(script, 0), f"{script} compared fewer results with its baseline: {checks}"


def test_agreement_check_refuses_a_wrong_result():
    from benchmarks.common import check_agreement

    assert check_agreement("same", 1e-7, 1e-4) == 1e-7
    for diff in (1e-3, float("nan")):
        with pytest.raises(SystemExit, match="check FAILED"):
            check_agreement("wrong", diff, 1e-4)


def test_gpu_check_cpu_smoke(tmp_path):
    # Every section runs (exit status 0 needs every row to meet its criterion; goals read NOGOAL
    # on the CPU), and the rows, timings and trace are written.
    out = _run(["benchmarks/gpu_check.py", "--cpu-smoke"], tmp_path)
    assert "FAIL" not in out and "MISS" not in out and "| PASS" in out
    for section in ("kernels", "compile", "graphs", "decisions", "ops", "scorer", "training", "tiling", "profile", "nvtx"):
        assert f"| {section} /" in out.replace("| PASS    | ", "| ").replace("| NOGOAL  | ", "| "), section
    for name in ("gpu_check.csv", "gpu_check.log", "gpu_timings.csv", "scorer_trace.json.gz"):
        assert (tmp_path / name).exists(), name


def test_gpu_check_only_reruns_one_section(tmp_path):
    out = _run(["benchmarks/gpu_check.py", "--cpu-smoke", "--only", "nvtx"], tmp_path)
    assert "nvtx / ranges emitted" in out and "kernels /" not in out


def test_plot_draws_each_csv(tmp_path):
    (tmp_path / "ops.csv").write_text(
        "machine,commit,date,torch,bench,path,ms_per_image\n"
        "cpu,abc,2026-01-01,2.14,anomaly_map,ours,1.0\n"
        "cpu,abc,2026-01-01,2.14,anomaly_map,reference,22.0\n"
    )
    _run(["-m", "benchmarks.plot", "--results", str(tmp_path)], tmp_path)
    from PIL import Image

    with Image.open(tmp_path / "ops.png") as img:
        assert img.size[0] > 500 and img.size[1] > 60


def test_tiling_evidence_keeps_its_maps_and_compares_the_decision_rules_on_them(tmp_path):
    # The #36 protocol in miniature: calibration normals kept apart, the maps stored, every rule
    # (those that need the normals' maps, and those that need the images, included) scored on
    # them, one row per rule.
    _run(["-m", "benchmarks.bench_tiling", "--quick", "--skip-throughput", "--evidence", "--tiles-only",
          "--category", "plate", "--n-calib", "2", "--maps-out", str(tmp_path / "maps"),
          "--data", str(tmp_path / "set_{category}")], tmp_path)
    stored = sorted((tmp_path / "maps").glob("*.npz"))
    assert [p.name for p in stored] == ["maps_plate_s0_recon.npz"]
    out = _run(["-m", "benchmarks.bench_tiling", "--rules-from", str(stored[0]), "--no-save",
                "--data", str(tmp_path / "set_{category}")], tmp_path)
    from benchmarks.bench_tiling import RULES

    for rule in RULES:
        assert f"| {rule} " in out, rule
