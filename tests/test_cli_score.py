"""``ckaad-fast score`` on a tiny checkpoint on the CPU: results files, maps, resume, atomic
writes, and clear one-line errors (never a traceback, never lost results)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ckaad_fast import profiling
from ckaad_fast.cli import build_parser, main
from ckaad_fast.model import ModelConfig, save_checkpoint
from ckaad_fast.training import CKAAD
from ckaad_fast.scoring import Scorer, map_names

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=SIZE, topk=10, strategy="recon")
        model = CKAAD(cfg, weights="none").eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model)
    return path


@pytest.fixture
def data(tmp_path):
    """A folder with good images in two sub-folders and one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    paths = []
    for sub, n in (("a", 3), ("b", 3)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            p = root / sub / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
    bad = root / "b" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root, sorted(paths + [str(bad)]), str(bad)


NOT_ALL = 1  # the exit code when some image could not be scored: `root` holds a corrupt file


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def score(ckpt, inputs, out, *extra):
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
    return main(["score", "--checkpoint", str(ckpt), "--input", *map(str, inputs), "--out", str(out),
                 "--batch-size", "3", "--num-workers", "0", "--no-progress", *extra])


# ------------------------------------------------------------------------------------------------
def test_scores_csv_rows_equal_the_scorer(ckpt, data, tmp_path):
    root, paths, bad = data
    out = tmp_path / "out"
    assert score(ckpt, root, out, "--threshold", "0.5") == NOT_ALL
    fields, rows = read_csv(out / "scores.csv")
    assert fields == ["path", "score", "error", "is_anomalous"]
    assert [r["path"] for r in rows] == paths
    ref = {r.path: r for r in Scorer.from_checkpoint(ckpt, num_workers=0).score_paths(paths)}
    for r in rows:
        if r["path"] == bad:
            assert r["score"] == "" and r["error"] and r["is_anomalous"] == ""
            assert "\n" not in r["error"]
        else:
            assert r["error"] == ""
            assert float(r["score"]) == pytest.approx(ref[r["path"]].score, rel=1e-7)
            assert r["is_anomalous"] == str(float(r["score"]) >= 0.5)
    assert not (out / "maps").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_no_threshold_no_column_and_explicit_files(ckpt, data, tmp_path):
    _, paths, _ = data
    out = tmp_path / "out"
    assert score(ckpt, paths[:2], out, "--topk", "mean") == 0
    fields, rows = read_csv(out / "scores.csv")
    assert fields == ["path", "score", "error"] and len(rows) == 2


def test_npy_maps(ckpt, data, tmp_path):
    root, paths, bad = data
    out = tmp_path / "out"
    assert score(ckpt, root, out, "--maps", "npy") == NOT_ALL
    names = map_names(paths, ".npy")
    assert names[paths[0]] == os.path.join("a", "0.png.npy")
    ref = {r.path: r for r in Scorer.from_checkpoint(ckpt, num_workers=0).score_paths(paths)}
    for p in paths:
        f = out / "maps" / names[p]
        if p == bad:
            assert not f.exists()
        else:
            np.testing.assert_allclose(np.load(f), ref[p].map, rtol=1e-6, atol=1e-7)


def test_png_maps_share_one_colour_scale(ckpt, data, tmp_path):
    root, paths, bad = data
    out = tmp_path / "out"
    assert score(ckpt, root, out, "--maps", "png", "--map-range", "0", "2") == NOT_ALL
    scale = json.loads((out / "maps" / "colour_scale.json").read_text())
    assert scale == {"colormap": "turbo", "lo": 0.0, "hi": 2.0}
    names = map_names(paths, ".png")
    for p in paths:
        if p != bad:
            with Image.open(out / "maps" / names[p]) as im:
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    # Without --map-range: the first batch's range, saved for the run.
    out2 = tmp_path / "out2"
    assert score(ckpt, root, out2, "--maps", "png") == NOT_ALL
    scale = json.loads((out2 / "maps" / "colour_scale.json").read_text())
    assert scale["hi"] > scale["lo"]


def test_resume_skips_done_rows_and_retries_errors(ckpt, data, tmp_path, monkeypatch):
    root, paths, bad = data
    out = tmp_path / "out"
    assert score(ckpt, root, out, "--maps", "npy") == NOT_ALL
    _, first = read_csv(out / "scores.csv")
    # Without --resume an existing results file is never silently replaced.
    assert score(ckpt, root, out) == 2
    # Repair the corrupt file, delete one map: both are scored again, nothing else.
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(bad, format="PNG")
    os.unlink(out / "maps" / map_names(paths, ".npy")[paths[0]])
    seen = []
    real = Scorer.score_paths

    def spy(self, todo, *a, **k):
        seen.extend(todo)
        return real(self, todo, *a, **k)

    monkeypatch.setattr(Scorer, "score_paths", spy)
    assert score(ckpt, root, out, "--maps", "npy", "--resume") == 0  # the corrupt file was repaired
    assert seen == [paths[0], bad]
    _, second = read_csv(out / "scores.csv")
    assert [r["path"] for r in second] == paths
    assert all(r["error"] == "" for r in second)
    for a, b in zip(first, second):
        if a["path"] not in (bad,):
            assert a["score"] == b["score"]
    # Resume with nothing left to do, and --overwrite scores everything again.
    seen.clear()
    assert score(ckpt, root, out, "--maps", "npy", "--resume") == 0
    assert seen == []
    assert score(ckpt, root, out, "--overwrite") == 0
    assert len(seen) == len(paths)


def test_interruption_keeps_finished_rows(ckpt, data, tmp_path, monkeypatch, capsys):
    root, paths, _ = data
    out = tmp_path / "out"
    real = Scorer.score_paths

    def crashing(self, todo, *a, **k):
        for i, r in enumerate(real(self, todo, *a, **k)):
            if i == 4:
                raise KeyboardInterrupt
            yield r

    monkeypatch.setattr(Scorer, "score_paths", crashing)
    assert score(ckpt, root, out, "--maps", "npy") == 130
    said = capsys.readouterr().err
    assert "scores.csv" in said and "--resume" in said  # what was kept, and how to go on
    _, rows = read_csv(out / "scores.csv")
    assert [r["path"] for r in rows] == paths[:4]  # complete rows, none half-written
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    monkeypatch.setattr(Scorer, "score_paths", real)
    assert score(ckpt, root, out, "--maps", "npy", "--resume") == NOT_ALL
    _, rows = read_csv(out / "scores.csv")
    assert [r["path"] for r in rows] == paths


def test_crash_in_the_model_keeps_finished_rows(ckpt, data, tmp_path, monkeypatch, capsys):
    root, paths, _ = data
    out = tmp_path / "out"
    calls = []
    real = Scorer._run

    def failing(self, x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, x)

    monkeypatch.setattr(Scorer, "_run", failing)
    assert score(ckpt, root, out) == 2
    assert "illegal memory access" in capsys.readouterr().err
    _, rows = read_csv(out / "scores.csv")
    assert [r["path"] for r in rows] == paths[:3]


@pytest.mark.parametrize(
    "setup, match",
    [
        ("empty_folder", "no image files"),
        ("missing_input", "does not exist"),
        ("missing_ckpt", "does not exist"),
        ("wrong_kind", "not a ckaad_fast checkpoint"),
        ("untrusted", "weights_only"),
        ("cuda_graphs_cpu", "CUDA"),
        ("fp16_cpu", "CUDA"),
        ("resume_and_overwrite", "contradict"),
    ],
)
def test_clear_errors(setup, match, ckpt, data, tmp_path, capsys):
    root, _, _ = data
    ck, inp, extra = ckpt, root, []
    if setup == "empty_folder":
        inp = tmp_path / "empty"
        inp.mkdir()
    elif setup == "missing_input":
        inp = tmp_path / "nope"
    elif setup == "missing_ckpt":
        ck = tmp_path / "nope.pt"
    elif setup == "wrong_kind":
        ck = tmp_path / "sd.pt"
        torch.save({"weight": torch.zeros(3)}, ck)
    elif setup == "untrusted":
        ck = tmp_path / "evil.pt"
        torch.save({"format": "ckaad_fast.checkpoint", "obj": _Obj()}, ck)
    elif setup == "cuda_graphs_cpu":
        extra = ["--device", "cpu", "--cuda-graphs"]
    elif setup == "fp16_cpu":
        extra = ["--device", "cpu", "--dtype", "float16"]
    elif setup == "resume_and_overwrite":
        extra = ["--resume", "--overwrite"]
    assert score(ck, inp, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert err.startswith("ckaad-fast score: error: ")
    if setup != "untrusted":  # torch's own message, quoted by load_checkpoint, has line breaks
        assert err.strip().count("\n") == 0  # one line


class _Obj:
    pass


def test_profile_writes_a_trace_on_cpu(ckpt, data, tmp_path):
    root, _, _ = data
    prof = tmp_path / "prof"
    assert score(ckpt, root, tmp_path / "out", "--profile", str(prof)) == NOT_ALL
    trace = json.loads((prof / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "ckaad_fast/forward" in names and any(str(n).startswith("aten::") for n in names)


def test_nvtx_option_runs_on_cpu(ckpt, data, tmp_path):
    root, _, _ = data
    try:
        assert score(ckpt, root, tmp_path / "out", "--nvtx") == NOT_ALL
    finally:
        profiling._enabled = None  # back to the environment's choice for the other tests


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("train", "eval", "calibrate", "score", "demo"):
        assert name in sub.choices
        for action in sub.choices[name]._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"


@pytest.mark.slow
def test_console_script_help():
    for argv in (["--help"], ["score", "--help"], ["demo", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "ckaad_fast", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout
    assert "--cuda-graphs" in proc.stdout or "--epochs" in proc.stdout


def test_unwritable_output_is_one_clear_line(ckpt, data, tmp_path, capsys, monkeypatch):
    root, _, _ = data
    import ckaad_fast.scoring.results as results_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results_mod, "atomic_write_text", full)
    assert score(ckpt, root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
