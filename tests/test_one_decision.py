"""One score and one decision per image, whatever path computes it: the calibration's promise kept
by ``score`` in every precision, thresholds exact in float32, the exported graph deciding as the
Scorer does, resumes that refuse a change of precision, and second derivatives that are right."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ckaad_fast.ops as ops
from ckaad_fast.calibration import Calibration, read_calibration, threshold_at_fpr
from ckaad_fast.cli import main
from ckaad_fast.head import decision_threshold, float32_at_least, normalized_score
from ckaad_fast.model import Detector, ModelConfig, load_checkpoint, model_from_checkpoint
from ckaad_fast.scoring import Scorer

from helpers import read_rows, tiny_checkpoint, write_pngs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "tiny.pt", SIZE, "cka_patch")


def _pngs(folder, n, seed):
    return write_pngs(folder, n, seed, SIZE)


_rows = read_rows


# -- the calibration's promise --------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_score_flags_exactly_what_the_calibration_promised(ckpt, tmp_path, precision, recwarn):
    """calibrate --normal DIR --target-fpr 0.1 on 40 normal images promises 4; score with its
    default options flags exactly 4 of the same images, in either precision the calibration was
    computed in (score follows it), on any CPU."""
    normal = _pngs(tmp_path / "good", 40, 0)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--normal", str(normal), "--target-fpr", "0.1",
                 "--dtype", precision, "--quiet"]) == 0
    cal = read_calibration(load_checkpoint(ckpt))
    assert (cal.precision, cal.device) == (precision, "cpu")
    out = tmp_path / "out"
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(normal), "--out", str(out), "--num-workers", "0",
                 "--no-progress"]) == 0
    rows = _rows(out)
    assert sum(r["is_anomalous"] == "True" for r in rows) == 4
    assert json.loads((out / "run.json").read_text())["dtype"] == precision
    assert not [w for w in recwarn if "calibrated in" in str(w.message)]  # no change of precision, no warning


def test_another_precision_than_the_calibrations_warns_and_is_recorded(ckpt, tmp_path):
    normal = _pngs(tmp_path / "good", 40, 0)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--normal", str(normal), "--target-fpr", "0.1",
                 "--quiet"]) == 0
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="calibrated in float32"):
        assert main(["score", "--checkpoint", str(ckpt), "--input", str(normal), "--out", str(out),
                     "--num-workers", "0", "--no-progress", "--dtype", "bf16"]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert (manifest["dtype"], manifest["calibration_precision"]) == ("bfloat16", "float32")


def test_a_resume_refuses_a_change_of_precision(ckpt, tmp_path, capsys):
    imgs = _pngs(tmp_path / "line", 5, 1)
    out = tmp_path / "out"
    base = ["score", "--checkpoint", str(ckpt), "--input", str(imgs), "--out", str(out), "--num-workers", "0",
            "--no-progress"]
    assert main(base + ["--dtype", "bfloat16"]) == 0
    assert main(base + ["--resume", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "dtype 'bfloat16' there, 'float32' now" in err
    assert len(_rows(out)) == 5  # nothing mixed in


def test_a_calibration_made_on_another_kind_of_device_is_warned_about():
    cal = Calibration(image_threshold=1.0, score_min=0.0, score_max=2.0, method="f1", precision="float32",
                      device="cuda")
    assert "computed in float32 on cuda" in cal.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Detector(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=SIZE, topk=10),
                         weights="none")
    with pytest.warns(UserWarning, match="calibrated on cuda"):
        Scorer(model, calibration=cal)
    with pytest.raises(ValueError, match="device"):
        Calibration(image_threshold=1.0, score_min=0.0, score_max=2.0, method="f1", device="tpu")


def test_old_calibrations_are_float32_ones():
    cal = Calibration.from_dict({"image_threshold": 1.0, "score_min": 0.0, "score_max": 2.0, "method": "f1"})
    assert cal.precision is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Detector(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=SIZE, topk=10),
                         weights="none")
    assert Scorer(model, calibration=cal).dtype == torch.float32
    with pytest.raises(ValueError, match="not auto"):
        Calibration(image_threshold=1.0, score_min=0.0, score_max=2.0, method="f1", precision="auto")


# -- thresholds exact in float32 --------------------------------------------------------------------
def test_the_fpr_threshold_is_the_next_float32_above_the_quantile():
    rng = np.random.default_rng(3)
    scores = rng.random(40).astype(np.float32)
    t = threshold_at_fpr(scores, 0.1)
    assert float(np.float32(t)) == t  # a float32 number
    kth = np.sort(scores)[-5]  # the 5th largest: 4 may be flagged
    assert t == float(np.nextafter(kth, np.float32(np.inf)))
    # The same 4 are flagged in float64 (Python), float32 (a graph) and by the decision rule.
    assert (scores.astype(np.float64) >= t).sum() == 4
    assert (scores >= np.float32(t)).sum() == 4
    assert (torch.from_numpy(scores) >= torch.tensor(t, dtype=torch.float32)).sum() == 4


@pytest.mark.parametrize("sensitivity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_a_score_one_ulp_from_the_threshold_is_decided_alike_everywhere(sensitivity):
    cal = Calibration(image_threshold=1.234567891234, score_min=0.1, score_max=3.3, method="fpr", target_fpr=0.01)
    cut = cal.decision_threshold(sensitivity)
    if sensitivity == 1.0:
        assert cut == -np.inf and cal.is_anomalous(-1e30, 1.0)
        return
    c32 = np.float32(cut)
    assert float(c32) == cut and cut >= 1.234567891234 + (0.5 - sensitivity) * 3.2 - 1e-15
    below, above = np.nextafter(c32, np.float32(-np.inf)), np.nextafter(c32, np.float32(np.inf))
    for s32, expected in ((below, False), (c32, True), (above, True)):
        assert cal.is_anomalous(float(s32), sensitivity) is expected          # Python, float64
        assert bool(s32 >= c32) is expected                                   # numpy, float32
        assert bool(torch.tensor(s32) >= torch.tensor(cut, dtype=torch.float32)) is expected  # a graph
    # The normalised score reads 1 - sensitivity there, up to its own rounding, and never decides.
    assert abs(cal.normalize(float(c32)) - (1 - sensitivity)) < 1e-6


def test_float32_at_least_and_the_normalised_score_on_both_array_kinds():
    for x in (0.1, 1 / 3, 2.0, -0.7, 1e-30):
        f = float32_at_least(x)
        assert f >= x and float(np.float32(f)) == f and float(np.nextafter(np.float32(f), np.float32(-np.inf))) < x
    s = np.array([0.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(normalized_score(s, 1.0, 0.0, 2.0), [0.0, 0.5, 1.0, 1.0])
    torch.testing.assert_close(normalized_score(torch.tensor(s), 1.0, 0.0, 2.0), torch.tensor([0.0, 0.5, 1.0, 1.0],
                                                                                               dtype=torch.float64))
    assert decision_threshold(1.0, 0.0, 2.0, 0.5) == 1.0


# -- the exported graph decides as the Scorer does -----------------------------------------------------
def test_the_exported_graph_and_the_scorer_agree_on_every_decision_at_the_quantile(ckpt, tmp_path):
    """The threshold sits one float32 ulp above a calibration image's score (the 1% quantile rule);
    the graph compares in float32, the Scorer's rows in float64: the same images are flagged."""
    ort = pytest.importorskip("onnxruntime")
    from ckaad_fast.calibration import calibrate, normal_folder_set, write_calibration
    from ckaad_fast.export import export

    normal = _pngs(tmp_path / "good", 20, 2)
    model = model_from_checkpoint(ckpt)
    cfg = model.config
    cal = calibrate(model, normal_folder_set(normal, cfg.image_size, cfg.mean, cfg.std), target_fpr=0.1)
    write_calibration(ckpt, cal)
    scorer = Scorer.from_checkpoint(ckpt, num_workers=0)
    results = list(scorer.score_folder(normal, return_maps=False))
    scores = np.array([r.score for r in results], dtype=np.float32)
    # One image sits exactly one float32 ulp below the threshold, and it is not flagged.
    assert (np.nextafter(scores, np.float32(np.inf)) == np.float32(cal.image_threshold)).any()
    flagged = [cal.is_anomalous(r.score) for r in results]
    assert sum(flagged) == 2
    path = export(ckpt, tmp_path / "onnx", "onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.stack([np.asarray(Image.open(r.path).convert("RGB")).transpose(2, 0, 1) for r in results])
    score_g, _, anomalous_g, _ = sess.run(None, {"image": images})
    np.testing.assert_allclose(score_g, scores, rtol=1e-4, atol=1e-6)
    # The graph compares its float32 score with the exact float32 threshold: the Scorer's rule. So
    # the two decide alike wherever their scores do not straddle the threshold (their arithmetic
    # differs by float32 rounding; the threshold itself no longer moves).
    t32 = np.float32(cal.image_threshold)
    assert float(t32) == cal.image_threshold
    assert (anomalous_g == (score_g >= t32)).all()
    clear = np.abs(scores.astype(np.float64) - cal.image_threshold) > 1e-4 * abs(cal.image_threshold)
    assert (anomalous_g[clear] == np.array(flagged)[clear]).all()
    meta = json.loads((path.parent / "model.json").read_text())
    assert meta["decision_threshold"] == cal.image_threshold


# -- one head --------------------------------------------------------------------------------------
def test_every_path_scores_through_the_one_head(ckpt, tmp_path):
    """Detector.forward, the Scorer and the exported graph's standard-operator head give the same
    maps and scores (the standard-operator form to float32 rounding)."""
    from ckaad_fast.export import ScoringGraph

    model = model_from_checkpoint(ckpt)
    assert not hasattr(model, "discriminator")  # scoring never builds training's parts
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        s_model, m_model = model(x)
        s_scorer, m_scorer = Scorer(model, dtype="float32")(x)
        u8 = ((x * torch.tensor(model.config.std).view(1, 3, 1, 1) + torch.tensor(model.config.mean).view(1, 3, 1, 1))
              .clamp(0, 1) * 255).round().to(torch.uint8)
        xn = (u8.float() / 255.0 - torch.tensor(model.config.mean).view(1, 3, 1, 1)) / torch.tensor(
            model.config.std).view(1, 3, 1, 1)
        s_ref, m_ref = model(xn)
        s_graph, _, _, m_graph = ScoringGraph(model).eval()(u8)
    assert torch.equal(s_model, s_scorer) and torch.equal(m_model, m_scorer)
    torch.testing.assert_close(m_graph, m_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_graph, s_ref, rtol=1e-4, atol=1e-5)


def test_training_checkpoints_load_as_a_detector_and_fingerprint_alike(ckpt):
    from ckaad_fast.model import fingerprint
    from ckaad_fast.training import ckaad_from_checkpoint

    full = ckaad_from_checkpoint(ckpt)
    det = model_from_checkpoint(ckpt)
    assert full.discriminator is not None and type(det) is Detector
    assert fingerprint(full) == fingerprint(det)


# -- second derivatives ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_derivatives_of_the_losses_are_right(backend):
    """gradgradcheck in float64 through the eager CPU path (torch) and the registered ops (the
    Triton kernels in the interpreter): never silently wrong."""
    from torch.autograd import gradgradcheck

    # Small inputs: gradgradcheck perturbs every element, and each perturbation launches the
    # kernels in Triton's interpreter (2x3x4x5 elements took 92 s of the suite; 2x3x2x3 is 30% of them).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = [(6 * torch.randn(n, 1, 2, 3, generator=g, dtype=torch.float64)).requires_grad_() for n in (3, 2, 4)]
    with ops.backend(backend):
        assert gradgradcheck(lambda a, b: ops.cosine_reconstruction_loss([a], [b]), (x, y))
        assert gradgradcheck(lambda a, b: ops.cosine_error_map(a, b), (x, y))
        assert gradgradcheck(lambda a, b, c: ops.discriminator_loss([a], [b], [c]), tuple(s))
        assert gradgradcheck(lambda a: ops.generator_loss([a]), (s[2],))
        assert gradgradcheck(lambda a, b: ops.anomaly_map([a], [b], out_size=(7, 9), sigma=1.0), (x, y))


def test_the_drop_in_losss_hessian_vector_product_is_rd4ads():
    from ckaad_fast import dropin
    from ckaad_fast.ops import reference as ref

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)

    def hvp(loss):
        (gx,) = torch.autograd.grad(loss(x, y), x, create_graph=True)
        return torch.autograd.grad(gx, x, v)[0]

    ours = hvp(lambda a, b: dropin.cosine_distillation_loss([a], [b]))
    theirs = hvp(lambda a, b: ref.cosine_reconstruction_loss([b], [a]))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    per_pos = hvp(lambda a, b: dropin.cosine_distillation_loss([a], [b], per_position=True))
    per_pos_ref = hvp(lambda a, b: ref.cosine_error_map(a, b).mean())
    torch.testing.assert_close(per_pos, per_pos_ref, rtol=1e-10, atol=1e-12)


def test_a_results_folder_of_the_earlier_fingerprint_rule_is_refused_clearly(tmp_path):
    from ckaad_fast.errors import ArgumentError
    from ckaad_fast.scoring.manifest import check_resume

    now = {"version": 2, "model_sha256": "b" * 64, "topk": 10, "image_size": [32, 32], "sigma": 4.0,
           "border": "reflect", "dtype": "float32"}
    with pytest.raises(ArgumentError, match="earlier ckaad_fast"):
        check_resume({**now, "version": 1, "model_sha256": "a" * 64}, now, tmp_path)
    check_resume({**now, "version": 1}, now, tmp_path)  # no discriminator: alike by both rules, resumed
