"""The exported graph equals the Scorer: ONNX Runtime on the CPU against the eager forward."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

from ckaad_fast.calibration import Calibration, write_calibration  # noqa: E402
from ckaad_fast.cli import main  # noqa: E402
from ckaad_fast.errors import ArgumentError  # noqa: E402
from ckaad_fast.export import MAX_BATCH, export, export_onnx  # noqa: E402
from ckaad_fast.model import ModelConfig, save_checkpoint  # noqa: E402
from ckaad_fast.training import CKAAD  # noqa: E402
from ckaad_fast.scoring import Scorer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # an export takes seconds
SIZE = 48


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CKAAD(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=SIZE, topk=10,
                                  strategy="recon"), weights="none").eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model)
    return path


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


def test_onnx_runtime_scores_like_the_scorer_with_a_dynamic_batch(ckpt, tmp_path):
    path = export_onnx(ckpt, tmp_path / "x")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["score", "normalized_score", "is_anomalous", "anomaly_map"]
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32")
    for n in (1, 3):  # one graph, any batch
        img = _images(n, n)
        score, _, anomalous, amap = sess.run(None, {"image": img})
        ref_s, ref_m = scorer(scorer.normalise(torch.from_numpy(img)))
        np.testing.assert_allclose(score, ref_s.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(amap, ref_m.numpy(), rtol=1e-4, atol=1e-5)
        assert anomalous.dtype == np.bool_ and not anomalous.any()  # not calibrated: no decision
    side = json.loads((tmp_path / "x" / "model.json").read_text())
    assert side["calibrated"] is False and side["image_size"] == [SIZE, SIZE]
    assert side["input"]["batch_range"] == [1, MAX_BATCH]
    assert side["model_sha256"] == scorer.fingerprint()


def test_a_calibrated_export_decides_as_score_does(ckpt, tmp_path):
    img = _images(6, 7)
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32")
    raw, _ = scorer(scorer.normalise(torch.from_numpy(img)))
    mid = float(np.median(raw.numpy()))
    cal = Calibration(image_threshold=mid, score_min=float(raw.min()), score_max=float(raw.max()), method="f1",
                      num_normal=3, num_anomalous=3)
    calibrated = tmp_path / "cal.pt"
    write_calibration(ckpt, cal, out=calibrated)
    path = export_onnx(calibrated, tmp_path / "x", batch=6)
    score, normalized, anomalous, _ = ort.InferenceSession(str(path)).run(None, {"image": img})
    np.testing.assert_allclose(normalized, cal.normalize(score), rtol=1e-5, atol=1e-6)
    assert anomalous.tolist() == [cal.is_anomalous(float(s)) for s in raw.numpy()]


def test_the_sensitivity_moves_the_exported_decision_without_exporting_again(ckpt, tmp_path):
    img = _images(8, 9)
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32")
    raw, _ = scorer(scorer.normalise(torch.from_numpy(img)))
    cal = Calibration(image_threshold=float(np.median(raw.numpy())), score_min=float(raw.min()),
                      score_max=float(raw.max()), method="f1", num_normal=4, num_anomalous=4)
    calibrated = tmp_path / "cal.pt"
    write_calibration(ckpt, cal, out=calibrated)
    path = export_onnx(calibrated, tmp_path / "x")  # one file, dynamic batch
    sess = ort.InferenceSession(str(path))
    decided = {}
    for s in (0.0, 0.3, 0.5, 0.7, 1.0):
        score, _, anomalous, _ = sess.run(None, {"image": img, "sensitivity": np.array([s])})
        # Exactly the Scorer's rule at that sensitivity, image by image.
        assert anomalous.tolist() == [cal.is_anomalous(float(v), s) for v in score]
        decided[s] = int(anomalous.sum())
    assert decided[0.3] < decided[0.7] and decided[1.0] == 8  # two sensitivities, two decision sets
    # Left out, the checkpoint's (the export's) sensitivity decides; the sidecar says so.
    assert sess.run(None, {"image": img})[2].sum() == decided[0.5]
    side = json.loads((tmp_path / "x" / "model.json").read_text())
    assert side["sensitivity_input"] == {"name": "sensitivity", "dtype": "float64", "shape": [1], "default": 0.5,
                                         "optional": True}


def test_export_refuses_an_existing_export_and_bad_arguments(ckpt, tmp_path, capsys):
    export_onnx(ckpt, tmp_path / "x", batch=2)
    with pytest.raises(ArgumentError) as e:
        export_onnx(ckpt, tmp_path / "x", batch=2)
    assert e.value.name == "out"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "y"), "--format", "tflite"])
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "z")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # Every option is checked before anything is written.
    for extra, flag in ((["--batch", "4"], "--triton-repo"), (["--max-batch-size", "0"], "--max-batch-size"),
                        (["--max-batch-size", "-5"], "--max-batch-size")):
        out = tmp_path / f"t{extra[1]}"
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--triton-repo",
                     str(tmp_path / "repo"), *extra]) == 2
        assert flag in capsys.readouterr().err and not out.exists() and not (tmp_path / "repo").exists()
    with pytest.raises(ArgumentError, match=r"\[1, 4096\]"):
        export_onnx(ckpt, tmp_path / "big", batch=100_000)
    assert not (tmp_path / "big").exists()


def test_openvino_scores_like_the_scorer(ckpt, tmp_path):
    ov = pytest.importorskip("openvino")
    path = export(ckpt, tmp_path / "ov", "openvino")
    assert path.name == "model.xml" and path.with_suffix(".bin").is_file()
    # OpenVINO's CPU plugin computes in bfloat16 on CPUs with bf16 units unless told otherwise.
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    img = _images(3, 5)
    result = compiled(img)
    score, amap = result[compiled.output("score")], result[compiled.output("anomaly_map")]
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32")
    ref_s, ref_m = scorer(scorer.normalise(torch.from_numpy(img)))
    np.testing.assert_allclose(score, ref_s.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(amap, ref_m.numpy(), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "ov" / "model.json").read_text())["format"] == "openvino"


def test_the_triton_repository_parses_with_the_servers_schema(ckpt, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--triton-repo",
                 str(tmp_path / "repo"), "--max-batch-size", "32"]) == 0
    config = text_format.Parse((tmp_path / "repo" / "ckaad" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 32 and config.backend == "onnxruntime" and config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == ["image"] and list(config.input[0].dims) == [3, SIZE, SIZE]
    assert [o.name for o in config.output] == ["score", "normalized_score", "is_anomalous", "anomaly_map"]
    assert (tmp_path / "repo" / "ckaad" / "1" / "model.onnx").read_bytes() == (tmp_path / "x" / "model.onnx").read_bytes()
    # A fixed batch cannot be batched dynamically by the server: refused, naming the option.
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "y"), "--batch", "4",
                 "--triton-repo", str(tmp_path / "repo2")]) == 2


def test_the_aotinductor_package_scores_like_the_scorer(ckpt, tmp_path):
    path = export(ckpt, tmp_path / "pt2", "pt2")  # a C++ compilation: about 20 s on 2 cores
    runner = torch._inductor.aoti_load_package(str(path))
    img = _images(3, 9)
    score, _, anomalous, amap = runner(torch.from_numpy(img))
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32")
    ref_s, ref_m = scorer(scorer.normalise(torch.from_numpy(img)))
    torch.testing.assert_close(score, ref_s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(amap, ref_m, rtol=1e-4, atol=1e-5)
    assert anomalous.dtype == torch.bool and json.loads((tmp_path / "pt2" / "model.json").read_text())["format"] == "pt2"


def test_a_float16_graph_scores_close_to_float32_and_bfloat16_is_for_pt2(ckpt, tmp_path):
    path = export(ckpt, tmp_path / "h", "onnx", dtype="float16")
    img = _images(2, 3)
    score, _, _, amap = ort.InferenceSession(str(path)).run(None, {"image": img})
    assert score.dtype == np.float32 and amap.dtype == np.float32  # maps and scores stay float32
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32")
    ref_s, _ = scorer(scorer.normalise(torch.from_numpy(img)))
    np.testing.assert_allclose(score, ref_s.numpy(), rtol=1e-2)
    with pytest.raises(ArgumentError) as e:
        export(ckpt, tmp_path / "b", "onnx", dtype="bfloat16")
    assert e.value.name == "dtype" and "pt2" in e.value.message
