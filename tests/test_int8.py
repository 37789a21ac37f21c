"""INT8: calibrate quantizes the graph (NNCF) and picks the threshold on its scores; the Scorer's
OpenVINO engine and the exported OpenVINO model run that same graph, so the calibration's promise
holds; the report says what int8 cost; int8 is refused wherever it cannot be honoured."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nncf")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

from ckaad_fast.calibration import calibrate, normal_folder_set, read_calibration, write_calibration  # noqa: E402
from ckaad_fast.cli import main  # noqa: E402
from ckaad_fast.errors import ArgumentError  # noqa: E402
from ckaad_fast.export import export  # noqa: E402
from ckaad_fast.model import load_checkpoint, model_from_checkpoint  # noqa: E402
from ckaad_fast.precision import resolve_precision  # noqa: E402
from ckaad_fast.runtime.quantize import QuantizedGraph  # noqa: E402
from ckaad_fast.scoring import Scorer  # noqa: E402

from helpers import tiny_checkpoint, write_pngs  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*random weights")]
SIZE = 32
N_NORMAL = 20


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKAAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    normal = write_pngs(root / "normal", N_NORMAL, 1, SIZE)
    anomalous = write_pngs(root / "anomalous", 6, 2, SIZE)
    for p in anomalous.iterdir():  # a bright block: something a random network maps elsewhere
        a = np.asarray(Image.open(p)).copy()
        a[4:20, 6:22] = 255
        Image.fromarray(a).save(p)
    return normal, anomalous


@pytest.fixture(scope="module")
def int8_ckpt(tmp_path_factory, data):
    """A tiny checkpoint calibrated in int8 (post-training, on normal images only)."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", SIZE)
    model = model_from_checkpoint(path)
    cfg = model.config
    cal = calibrate(model, normal_folder_set(data[0], cfg.image_size, cfg.mean, cfg.std), target_fpr=0.1,
                    precision="int8")
    write_calibration(path, cal)
    return path


def test_the_int8_calibration_stores_its_graph_and_the_scorer_keeps_its_promise(int8_ckpt, data):
    ckpt = load_checkpoint(int8_ckpt)
    cal = read_calibration(ckpt)
    assert cal.precision == "int8" and cal.engine == "openvino"
    assert isinstance(cal.int8_graph, QuantizedGraph) and "FakeQuantize" in cal.int8_graph.xml
    q = cal.quantization
    assert q["method"] == "post-training" and q["scope"] == "autoencoder" and q["calibration_images"] == N_NORMAL
    assert q["quantizers"] > 0 and q["auroc_drop"] is None  # normal images only: no AUROC to lose
    scorer = Scorer.from_checkpoint(int8_ckpt)
    assert scorer.engine == "openvino" and scorer.precision == "int8"
    assert scorer.model is None  # the graph travels in the checkpoint: no PyTorch network is built
    scores = np.array([r.score for r in scorer.score_folder(data[0])])
    # The same quantized graph on the same images: the calibration's range and its 10% promise.
    np.testing.assert_allclose([scores.min(), scores.max()], [cal.score_min, cal.score_max], rtol=1e-6)
    assert (scores >= cal.decision_threshold()).sum() <= 0.1 * N_NORMAL
    # The report's score change is what the float32 graph and the int8 one give on those images,
    # in the report's batches of 8: on another CPU a kernel chosen by batch shape can move a value
    # by an ulp, which an int8 quantizer can turn into a whole step.
    with pytest.warns(UserWarning, match="scoring in float32 a model calibrated in int8"):
        float_scorer = Scorer.from_checkpoint(int8_ckpt, dtype="float32", engine="openvino", batch_size=8)
    f32 = np.array([r.score for r in float_scorer.score_folder(data[0])])
    int8 = np.array([r.score for r in Scorer.from_checkpoint(int8_ckpt, batch_size=8).score_folder(data[0])])
    change = np.abs(int8 - f32) / np.abs(f32)
    assert change.max() == pytest.approx(q["relative_score_change"]["max"], rel=1e-3, abs=1e-6)


def test_the_accuracy_controlled_mode_keeps_the_drop_within_its_bound(tmp_path, data):
    path = tiny_checkpoint(tmp_path / "tiny.pt", SIZE)
    code = main(["calibrate", "--checkpoint", str(path), "--normal", str(data[0]), "--target-fpr", "0.1",
                 "--dtype", "int8", "--int8-scope", "network", "--int8-check-normal", str(data[0]),
                 "--int8-check-anomalous", str(data[1]), "--max-auroc-drop", "0.05", "--quiet"])
    assert code == 0
    q = read_calibration(load_checkpoint(path)).quantization
    assert q["method"] == "accuracy-controlled" and q["measured_on"] == "check set"
    assert (q["check_normal"], q["check_anomalous"]) == (N_NORMAL, 6)
    assert q["auroc_drop"] == pytest.approx(q["auroc_float32"] - q["auroc_int8"])
    assert q["auroc_drop"] <= 0.05 + 1e-12 and q["max_auroc_drop"] == 0.05


def test_the_exported_int8_model_decides_as_its_outputs_say_with_the_report_in_its_sidecar(int8_ckpt, tmp_path):
    import openvino as ov

    target = export(int8_ckpt, tmp_path / "ov", "openvino")  # int8: the checkpoint's calibration
    meta = json.loads((tmp_path / "ov" / "model.json").read_text())
    assert meta["dtype"] == "int8" and meta["calibration"]["quantization"]["method"] == "post-training"
    cal = read_calibration(load_checkpoint(int8_ckpt))
    compiled = ov.Core().compile_model(str(target), "CPU")
    images = np.random.default_rng(5).integers(0, 256, (5, 3, SIZE, SIZE), dtype=np.uint8)
    out = compiled(images)
    got = {o.get_any_name(): out[o] for o in compiled.outputs}
    assert list(got) == ["score", "normalized_score", "is_anomalous", "anomaly_map"]
    s = got["score"]
    assert got["anomaly_map"].shape == (5, SIZE, SIZE)
    np.testing.assert_array_equal(got["is_anomalous"], s >= np.float32(cal.decision_threshold()))
    np.testing.assert_allclose(got["normalized_score"], cal.normalize(s), rtol=1e-6, atol=1e-6)
    # The Scorer runs the same graph on the same normalised pixels (the export normalises by a
    # table of the Scorer's own values): the same scores. A one-ulp difference in the input would
    # show as a quantization step somewhere, about 1e-3 relative, far above this bound.
    scorer = Scorer.from_checkpoint(int8_ckpt)
    ref, _ = scorer(scorer.normalise(torch.from_numpy(images)))
    np.testing.assert_allclose(s, ref.numpy(), rtol=1e-6, atol=0)


def test_int8_is_refused_where_it_cannot_be_honoured(int8_ckpt, tmp_path):
    with pytest.raises(ArgumentError, match="precision: int8 is a quantized copy"):
        resolve_precision("int8", "cpu")  # training, eval, autocast: never int8
    plain = tiny_checkpoint(tmp_path / "plain.pt", SIZE)
    with pytest.raises(ArgumentError, match="dtype: int8 needs a checkpoint calibrated in int8"):
        Scorer.from_checkpoint(plain, dtype="int8")
    with pytest.raises(ArgumentError, match="engine: onnxruntime cannot run the int8 graph"):
        Scorer.from_checkpoint(int8_ckpt, engine="onnxruntime")
    with pytest.raises(ArgumentError, match="engine: torch cannot run the int8 graph .*use engine openvino"):
        Scorer.from_checkpoint(int8_ckpt, engine="torch")
    with pytest.raises(ArgumentError, match="dtype: int8 runs on the openvino engine"):
        Scorer.from_checkpoint(int8_ckpt, compile=True)
    with pytest.raises(ArgumentError, match="topk: the int8 graph scores with top-k 10"):
        Scorer.from_checkpoint(int8_ckpt, topk=5)
    with pytest.raises(ArgumentError, match="dtype: int8 graphs are for --format openvino"):
        export(int8_ckpt, tmp_path / "x", "onnx", dtype="int8")
    with pytest.raises(ArgumentError, match="dtype: int8 needs a checkpoint calibrated in int8"):
        export(plain, tmp_path / "y", "openvino", dtype="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32 scoring of an int8 calibration warns: allowed
        assert Scorer.from_checkpoint(int8_ckpt, dtype="float32").precision == "float32"
    # A damaged graph is found by its checksum, not run.
    ckpt = load_checkpoint(int8_ckpt)
    ckpt["int8_graph"]["weights"] = bytes(reversed(ckpt["int8_graph"]["weights"]))
    with pytest.raises(ValueError, match="does not match its checksum"):
        read_calibration(ckpt)


def test_a_later_float32_calibration_drops_the_int8_graph(int8_ckpt, tmp_path, data):
    model = model_from_checkpoint(int8_ckpt)
    cfg = model.config
    cal = calibrate(model, normal_folder_set(data[0], cfg.image_size, cfg.mean, cfg.std), target_fpr=0.1,
                    engine="torch")
    out = write_calibration(int8_ckpt, cal, out=tmp_path / "f32.pt")
    assert "int8_graph" not in load_checkpoint(out) and read_calibration(load_checkpoint(out)).quantization is None


def test_an_int8_calibration_that_inserts_no_quantizer_refuses(tmp_path, data, monkeypatch):
    # A graph whose nodes lack the detector's part names (an export from before they were named)
    # would be "quantized" with no quantizer: refused, naming the scope, not reported as int8.
    import ckaad_fast.runtime.graphs as graphs

    monkeypatch.setattr(graphs, "_name_nodes_by_module", lambda path: None)
    path = tiny_checkpoint(tmp_path / "unnamed.pt", SIZE, seed=21)
    model = model_from_checkpoint(path)
    cfg = model.config
    with pytest.raises(ArgumentError, match="int8_scope: NNCF inserted no quantizer"):
        calibrate(model, normal_folder_set(data[0], cfg.image_size, cfg.mean, cfg.std), target_fpr=0.1,
                  precision="int8")


def test_a_check_set_too_small_for_its_bound_is_refused_and_a_swapped_one_warned_about(tmp_path, data):
    from ckaad_fast.runtime.quantize import CheckSetWarning

    path = tiny_checkpoint(tmp_path / "tiny.pt", SIZE)
    one_each = tmp_path / "one"
    for kind, src in (("normal", data[0]), ("anomalous", data[1])):
        (one_each / kind).mkdir(parents=True)
        first = sorted(src.iterdir())[0]
        (one_each / kind / first.name).write_bytes(first.read_bytes())
    args = ["calibrate", "--checkpoint", str(path), "--normal", str(data[0]), "--target-fpr", "0.1", "--dtype",
            "int8", "--quiet"]
    assert main(args + ["--int8-check-normal", str(one_each / "normal"), "--int8-check-anomalous",
                        str(one_each / "anomalous")]) == 2  # 1 x 1 pairs cannot measure half a point
    # The folders swapped: the defects called normal score higher than the "anomalies".
    with pytest.warns(CheckSetWarning, match="below chance"):
        assert main(args + ["--int8-check-normal", str(data[1]), "--int8-check-anomalous", str(data[0]),
                            "--max-auroc-drop", "0.5"]) in (0, 2)


def test_int8_options_without_int8_are_refused(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "tiny.pt", SIZE)
    assert main(["calibrate", "--checkpoint", str(path), "--normal", str(tmp_path), "--max-auroc-drop", "0.01"]) == 2
    assert "--max-auroc-drop: only with --dtype int8" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x"), "--max-batch-size", "8"]) == 2
    assert "--max-batch-size: only with --triton-repo" in capsys.readouterr().err


def test_eval_refuses_a_damaged_int8_graph_before_printing_anything(int8_ckpt, tmp_path, capsys):
    import torch as _torch

    ckpt = load_checkpoint(int8_ckpt)
    ckpt["int8_graph"]["weights"] = bytes(reversed(ckpt["int8_graph"]["weights"]))
    damaged = tmp_path / "damaged.pt"
    _torch.save(ckpt, damaged)
    code = main(["eval", "--checkpoint", str(damaged), "--layout", "folder", "--data", str(tmp_path),
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and "checksum" in captured.err and captured.out == ""
