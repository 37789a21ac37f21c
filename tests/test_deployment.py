"""The deployment path: an export folder scored without PyTorch (the client, and ``ckaad-fast score
--checkpoint EXPORT_DIR``) gives the checkpoint's decisions, regions and results folder, in a
process where every torch import is blocked; a tiled export gives the Scorer's stitched maps and
scores; and the documented install without torch holds every module the path imports."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

from ckaad_fast.calibration import calibration_from_scores, write_calibration  # noqa: E402
from ckaad_fast.export import export  # noqa: E402
from ckaad_fast.regions import Region, find_regions  # noqa: E402
from ckaad_fast.scoring import Scorer  # noqa: E402

from helpers import tiny_checkpoint, write_pngs  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*random weights")]
ROOT = Path(__file__).resolve().parent.parent
SIZE = 32

# Runs in a fresh interpreter with torch made unimportable: the deployment path must not need it.
_NO_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
    from ckaad_fast.deployment import Deployment

    folder, runtime, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    dep = Deployment(folder, runtime=runtime)
    out = [{"path": r.path, "score": r.score, "is_anomalous": r.is_anomalous, "error": r.error,
            "regions": None if r.regions is None else [vars(g) for g in r.regions]}
           for r in dep.score_paths(paths, batch_size=4)]
    print(json.dumps({"results": out, "torch": "torch" in sys.modules}))
""")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A calibrated tiny checkpoint (threshold in the middle of its images' scores, and a pixel
    threshold), its images, and the Scorer's decisions and maps on them."""
    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = tiny_checkpoint(tmp / "tiny.pt", SIZE)
    folder = write_pngs(tmp / "images", 10, seed=5, size=SIZE)
    scorer = Scorer.from_checkpoint(ckpt, device="cpu", dtype="float32", engine="torch")
    results = {r.path: r for r in scorer.score_folder(folder)}
    scores = np.sort([r.score for r in results.values()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibration_from_scores((scores >= np.median(scores)).astype(int), scores, precision="float32",
                                      device="cpu", engine="torch")
    # The threshold halfway between two images' scores: no image within float32 rounding of it,
    # so that the graph's scores (equal to rounding) must give the very same decisions.
    mid = len(scores) // 2
    assert scores[mid] - scores[mid - 1] > 1e-3 * abs(scores[mid])
    cal.image_threshold = float((scores[mid - 1] + scores[mid]) / 2)
    cal.pixel_threshold = float(np.quantile(np.stack([r.map for r in results.values()]), 0.995))
    write_calibration(ckpt, cal)
    return ckpt, cal, results


@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory):
    """The calibrated checkpoint exported once per format: {format: folder} (read only)."""
    tmp = tmp_path_factory.mktemp("exports")
    return {fmt: export(calibrated[0], tmp / fmt, format=fmt).parent for fmt in ("onnx", "openvino")}


def _run_without_torch(folder, runtime, paths):
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(folder), runtime, *paths], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_an_export_scored_without_torch_decides_as_the_checkpoint(calibrated, exported, fmt, runtime, tmp_path):
    ckpt, cal, results = calibrated
    paths = sorted(results)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    got = _run_without_torch(exported[fmt], runtime, paths + [str(bad)])
    assert got["torch"] is False
    rows = got["results"]
    assert [r["path"] for r in rows] == paths + [str(bad)]
    assert rows[-1]["score"] is None and "cannot identify image file" in rows[-1]["error"]
    threshold = cal.decision_threshold()
    for row in rows[:-1]:
        ref = results[row["path"]]
        # Same decoding, the same float32 forward as a graph: scores to float32 rounding, and the
        # decision the checkpoint's (no image here sits within that rounding of the threshold).
        assert row["score"] == pytest.approx(ref.score, rel=1e-4, abs=1e-6)
        assert row["is_anomalous"] == (ref.score >= threshold)
    # Regions: those of the checkpoint's maps, wherever a map is not within rounding of the
    # pixel threshold (then the two may differ by that pixel, never by a region's place).
    found = sum(len(r["regions"]) for r in rows[:-1])
    assert found > 0
    for row in rows[:-1]:
        ref_map = results[row["path"]].map
        near = np.abs(ref_map - cal.pixel_threshold) <= 1e-4 * abs(cal.pixel_threshold) + 1e-6
        if not near.any():
            assert [Region(**g) for g in row["regions"]] == [
                Region(g.x0, g.y0, g.x1, g.y1, g.area, pytest.approx(g.peak, rel=1e-4),
                       pytest.approx(g.mean, rel=1e-4)) for g in find_regions(ref_map, cal.pixel_threshold)]


def test_the_client_refuses_what_it_cannot_score_as_the_scorer(calibrated, tmp_path):
    from ckaad_fast.deployment import Deployment

    ckpt, _, _ = calibrated
    with pytest.raises(ValueError, match="cannot be read"):
        Deployment(tmp_path)
    out = export(ckpt, tmp_path / "x", format="onnx").parent
    side = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**side, "tiling": {"size": 16, "stride": 12,
                                                                   "image_score": {"topk": 10}}}))
    with pytest.raises(ValueError, match="16 px tiles are resized to its 32 px input"):
        Deployment(out)
    (out / "model.json").write_text(json.dumps({**side, "format": "pt2"}))
    with pytest.raises(ValueError, match="needs PyTorch"):
        Deployment(out)


# ------------------------------------------------------------------------------------------------
# ckaad-fast score --checkpoint EXPORT_DIR
# ------------------------------------------------------------------------------------------------
# The command line in a fresh interpreter; "--allow" lists the only top-level modules (beside the
# standard library and ckaad_fast) it may import, else torch alone is blocked.
_CLI = textwrap.dedent("""
    import importlib.abc, json, sys

    allowed = None
    if sys.argv[1] == "--allow":
        allowed = set(json.loads(sys.argv[2])) | set(sys.stdlib_module_names) | {"ckaad_fast"}
        del sys.argv[1:3]

    class Gate(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            top = name.split(".")[0]
            # Names with a leading underscore are the interpreter's own (_sysconfigdata_..., ...).
            if top == "torch" or (allowed is not None and top not in allowed and not top.startswith("_")):
                raise ImportError(f"{top} is not installed on this inference box (test)")

    sys.meta_path.insert(0, Gate())
    from ckaad_fast.cli import main

    try:
        code = main(sys.argv[1:])
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
""")


def _cli_without_torch(*argv, allow=None):
    pre = ["--allow", json.dumps(sorted(allow))] if allow is not None else []
    proc = subprocess.run([sys.executable, "-c", _CLI, *pre, *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("{"), proc.stderr
    return json.loads(last), proc.stderr


def _csv(path):
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_score_with_an_export_folder_keeps_the_results_folder_and_the_checkpoints_decisions(calibrated, exported,
                                                                                          tmp_path):
    from ckaad_fast.cli import main

    ckpt, cal, results = calibrated
    folder = Path(next(iter(results))).parent
    (tmp_path / "in").mkdir()
    inputs = [folder, tmp_path / "in" / "broken.png"]
    inputs[1].write_bytes(b"not an image")
    assert main(["score", "--checkpoint", str(ckpt), "--input", *map(str, inputs), "--out", str(tmp_path / "ref"),
                 "--engine", "torch", "--no-progress"]) == 1  # one file unreadable
    got, err = _cli_without_torch("score", "--checkpoint", exported["openvino"], "--input", *inputs,
                                  "--out", tmp_path / "dep", "--maps", "png", "--no-progress")
    assert got == {"code": 1, "torch": False}, err
    ref, dep = _csv(tmp_path / "ref" / "scores.csv"), _csv(tmp_path / "dep" / "scores.csv")
    assert list(dep[0]) == list(ref[0])  # the same columns: normalized_score, is_anomalous, regions
    assert [r["path"] for r in dep] == [r["path"] for r in ref]
    for a, b in zip(ref, dep):
        assert a["error"] == b["error"]  # the same error rows, word for word
        if a["error"]:
            continue
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-4)
        assert b["is_anomalous"] == a["is_anomalous"]
        # No map within rounding of the pixel threshold here (the client test checks that):
        # the same regions, to rounding of their scores.
        box = ("x0", "y0", "x1", "y1", "area")
        ra, rb = json.loads(a["regions"]), json.loads(b["regions"])
        assert [[g[k] for k in box] for g in rb] == [[g[k] for k in box] for g in ra]
    manifest = json.loads((tmp_path / "dep" / "run.json").read_text())
    assert manifest["engine"] == "openvino" and manifest["model_sha256"] == json.loads(
        (tmp_path / "ref" / "run.json").read_text())["model_sha256"]
    assert manifest["monitor"]["test"]["images"] == len(results)
    assert len(list((tmp_path / "dep" / "maps").rglob("*.png"))) == len(results)
    # A resume scores only the unreadable file again; another option is refused, naming it.
    got, err = _cli_without_torch("score", "--checkpoint", exported["openvino"], "--input", *inputs,
                                  "--out", tmp_path / "dep", "--maps", "png", "--resume")
    assert got["code"] == 1 and "9 already done" not in err and f"{len(results)} already done" in err
    got, err = _cli_without_torch("score", "--checkpoint", exported["openvino"], "--input", *inputs,
                                  "--out", tmp_path / "dep", "--maps", "png", "--resume", "--no-regions")
    assert got["code"] == 2 and "--resume" in err and "regions" in err


def test_score_with_an_export_folder_decides_at_the_exports_sensitivity(calibrated, tmp_path):
    ckpt, cal, results = calibrated
    export(ckpt, tmp_path / "export", format="onnx", sensitivity=0.9)
    got, err = _cli_without_torch("score", "--checkpoint", tmp_path / "export", "--input", *sorted(results),
                                  "--out", tmp_path / "o", "--no-progress")
    assert got == {"code": 0, "torch": False}, err
    assert "moved to sensitivity 0.9" in err
    rows = _csv(tmp_path / "o" / "scores.csv")
    flagged = [r["is_anomalous"] == "True" for r in rows]
    assert flagged == [results[r["path"]].score >= cal.decision_threshold(0.9) for r in rows]
    assert sum(flagged) > sum(results[r["path"]].score >= cal.decision_threshold() for r in rows)


@pytest.mark.parametrize("fmt, option, words", [
    ("onnx", ["--engine", "torch"], "--engine: an export folder is run by openvino or onnxruntime"),
    ("onnx", ["--compile"], "--compile: not for an export folder"),
    ("onnx", ["--device", "cuda"], "--device: an export folder runs on the CPU"),
    ("onnx", ["--topk", "3"], "--topk: not for an export folder"),
    ("openvino", ["--engine", "onnxruntime"], "--engine: must be one of ['openvino'] for openvino graphs"),
])
def test_score_with_an_export_folder_refuses_pytorchs_options_by_name(calibrated, exported, tmp_path, fmt, option,
                                                                     words):
    results = calibrated[2]
    got, err = _cli_without_torch("score", "--checkpoint", exported[fmt], "--input", next(iter(results)),
                                  "--out", tmp_path / "o", *option)
    assert got == {"code": 2, "torch": False} and words in err, err


def test_help_and_score_help_need_no_torch():
    # The command builds the parser of the command it runs only: --help lists every command from
    # its one line, and score's help is whole, both without importing torch (3-4 s of start-up).
    from ckaad_fast.cli import COMMANDS

    proc = subprocess.run([sys.executable, "-c", _CLI, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "torch": False}, proc.stderr
    assert all(name in proc.stdout and line[:40] in proc.stdout for name, line in COMMANDS.items())
    proc = subprocess.run([sys.executable, "-c", _CLI, "score", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "torch": False}, proc.stderr
    assert "CKPT_OR_EXPORT_DIR" in proc.stdout and "--engine" in proc.stdout


def _deploy_install() -> set[str]:
    """The top-level modules an inference box installed as the README says has: the packages of
    its torch-free install command and everything they require (their installed metadata)."""
    import re
    from importlib import metadata

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = re.search(r"pip install --no-deps [^\n]*&& pip install ([^\n`]+)", readme)
    assert line, "README: the install without torch"
    todo = [re.split(r"[<>=\[ ]", p)[0] for p in line.group(1).split() if not p.startswith("-")]
    dists, seen = set(), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        dists.add(name)
        todo += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires if "extra ==" not in r]
    assert "torch" not in dists
    return {module for module, owners in metadata.packages_distributions().items()
            if any(o.lower().replace("_", "-") in dists for o in owners)}


def test_the_documented_install_without_torch_scores_an_export_folder(calibrated, exported, tmp_path):
    # Every import outside the standard library, ckaad_fast and what the README's command installs
    # fails, as on an inference box installed that way: the deployment path must not need it.
    ckpt, cal, results = calibrated
    allowed = _deploy_install()
    assert {"numpy", "PIL", "openvino"} <= allowed and not {"torch", "torchvision", "nvtx"} & allowed
    got, err = _cli_without_torch("score", "--checkpoint", exported["openvino"], "--input", *sorted(results),
                                  "--out", tmp_path / "o", "--no-progress", allow=allowed)
    assert got == {"code": 0, "torch": False}, err
    rows = _csv(tmp_path / "o" / "scores.csv")
    assert [r["is_anomalous"] == "True" for r in rows] == [
        results[r["path"]].score >= cal.decision_threshold() for r in rows]


# ------------------------------------------------------------------------------------------------
# A tiled export through the client
# ------------------------------------------------------------------------------------------------
def test_a_tiled_export_through_the_client_equals_the_scorer(tmp_path):
    from PIL import Image

    from ckaad_fast.deployment import Deployment
    from ckaad_fast.model import ModelConfig, save_checkpoint
    from ckaad_fast.training import CKAAD

    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = CKAAD(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=32, topk=10,
                                  tile_size=32, tile_stride=24), weights="none").eval()
    save_checkpoint(tmp_path / "t.pt", model)
    rng = np.random.default_rng(4)
    sizes = [(75, 90), (32, 32), (40, 101), (20, 50)]  # the last is smaller than a tile
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    scorer = Scorer.from_checkpoint(tmp_path / "t.pt", device="cpu", dtype="float32", engine="torch", batch_size=4)
    ref = {r.path: r for r in scorer.score_paths(paths, return_maps=True)}
    for fmt in ("onnx", "openvino"):
        export(tmp_path / "t.pt", tmp_path / fmt, format=fmt)
        got = list(Deployment(tmp_path / fmt).score_paths(paths, batch_size=3, return_maps=True))
        assert [r.path for r in got] == paths
        for r in got:
            if not ref[r.path].ok:
                assert not r.ok and "smaller than the model's 32x32 tiles" in r.error
                continue
            assert r.map.shape == ref[r.path].map.shape
            np.testing.assert_allclose(r.map, ref[r.path].map, rtol=1e-4, atol=1e-5)
            assert r.score == pytest.approx(ref[r.path].score, rel=1e-4)
