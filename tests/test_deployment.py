"""The deployment client: an export folder scored without PyTorch gives the checkpoint's
decisions and regions, in a process where every torch import is blocked."""
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


def _run_without_torch(folder, runtime, paths):
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(folder), runtime, *paths], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_an_export_scored_without_torch_decides_as_the_checkpoint(calibrated, fmt, runtime, tmp_path):
    ckpt, cal, results = calibrated
    export(ckpt, tmp_path / "export", format=fmt)
    paths = sorted(results)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    got = _run_without_torch(tmp_path / "export", runtime, paths + [str(bad)])
    assert got["torch"] is False
    rows = got["results"]
    assert [r["path"] for r in rows] == paths + [str(bad)]
    assert rows[-1]["score"] is None and "cannot read the image" in rows[-1]["error"]
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
    (out / "model.json").write_text(json.dumps({**side, "tiling": {"tile_size": 16}}))
    with pytest.raises(ValueError, match="tiled model"):
        Deployment(out)
    (out / "model.json").write_text(json.dumps({**side, "format": "pt2"}))
    with pytest.raises(ValueError, match="needs PyTorch"):
        Deployment(out)
