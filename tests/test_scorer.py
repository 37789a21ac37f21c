"""The Scorer on a tiny checkpoint on the CPU: results equal to the model's own forward, padding
never leaks, bad files and bad checkpoints give clear errors or reported results."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ckaad_fast.data import load_image
from ckaad_fast.model import ModelConfig, save_checkpoint
from ckaad_fast.training import CKAAD
from ckaad_fast.data import decode_image
from ckaad_fast.scoring import Scorer, ScoreResult

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> CKAAD:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        cfg = ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=SIZE, topk=10, strategy="recon")
        return CKAAD(cfg, weights="none").eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model)
    return path


def write_images(folder, n, seed=0, size=(40, 36)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"), 7)


def model_forward(model, paths):
    cfg = model.config
    x = torch.stack([load_image(p, SIZE, cfg.mean, cfg.std) for p in paths])
    with torch.inference_mode():
        return model(x)


# ------------------------------------------------------------------------------------------------
def test_call_equals_model_forward():
    # A fresh reference, not the module's shared model: a Scorer puts the model it is given in its
    # layout (channels_last for bfloat16), and bit-equality needs the same convolution algorithm
    # (found by running the tests in a shuffled order).
    scorer = Scorer(tiny_model(), dtype="float32")
    x = torch.randn(3, 3, SIZE, SIZE)
    s, m = scorer(x)
    with torch.inference_mode():
        s0, m0 = tiny_model()(x)
    assert s.dtype == torch.float32 and m.dtype == torch.float32
    assert s.shape == (3,) and m.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(s, s0, rtol=0, atol=0)
    torch.testing.assert_close(m, m0, rtol=0, atol=0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_score_paths_equals_model_forward_in_input_order(model, ckpt, images, num_workers):
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=3, num_workers=num_workers)
    order = images[::-1]  # not sorted: results must follow the order given
    results = list(scorer.score_paths(order))
    assert [r.path for r in results] == order
    assert all(isinstance(r, ScoreResult) and r.ok and r.error is None for r in results)
    s0, m0 = model_forward(model, order)
    np.testing.assert_allclose([r.score for r in results], s0.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.stack([r.map for r in results]), m0.numpy(), rtol=1e-6, atol=1e-7)
    assert results[0].map.dtype == np.float32 and results[0].map.shape == (SIZE, SIZE)


def test_score_folder_and_no_maps(ckpt, images):
    folder = os.path.dirname(images[0])
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=4, num_workers=0)
    res = list(scorer.score_folder(folder, return_maps=False))
    assert [r.path for r in res] == sorted(images)
    assert all(r.map is None and r.score is not None for r in res)


def test_padding_never_leaks(model, ckpt, images, monkeypatch):
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=4, num_workers=0, pad_batches=True)
    seen = []
    run = scorer._run

    def spy(x):
        seen.append(x.shape[0])
        return run(x)

    monkeypatch.setattr(scorer, "_run", spy)
    paths = images[:5] + ["/nonexistent/x.png"] + images[5:6]  # 7 paths: batches of 4 and 3 (one unreadable)
    results = list(scorer.score_paths(paths))
    assert seen == [4, 4]  # both batches ran at the full, static batch size
    assert [r.path for r in results] == paths
    good = [r for r in results if r.ok]
    assert len(good) == 6 and not results[5].ok
    s0, m0 = model_forward(model, [r.path for r in good])
    np.testing.assert_allclose([r.score for r in good], s0.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.stack([r.map for r in good]), m0.numpy(), rtol=1e-6, atol=1e-7)


def test_pad_repeats_the_last_image():
    scorer = Scorer(tiny_model(), dtype="float32", batch_size=5, pad_batches=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    p = scorer._pad(x)
    assert p.shape[0] == 5
    assert torch.equal(p[:2], x) and all(torch.equal(p[i], x[1]) for i in range(2, 5))
    assert Scorer(tiny_model(), dtype="float32", batch_size=5)._pad(x) is x  # off by default on the CPU without compile


def test_bad_files_are_reported_and_the_rest_scored(model, ckpt, images, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png")
    truncated = tmp_path / "truncated.png"
    data = open(images[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    missing = tmp_path / "missing.png"
    paths = [images[0], str(corrupt), images[1], str(truncated), str(missing), str(text), images[2]]
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=2, num_workers=1)
    results = list(scorer.score_paths(paths))
    assert [r.path for r in results] == paths
    assert [r.ok for r in results] == [True, False, True, False, False, False, True]
    for r in results:
        if not r.ok:
            assert r.score is None and r.map is None
            assert isinstance(r.error, str) and "\n" not in r.error and len(r.error) < 400
    assert "FileNotFoundError" in results[4].error
    s0, _ = model_forward(model, [images[0], images[1], images[2]])
    np.testing.assert_allclose([r.score for r in results if r.ok], s0.numpy(), rtol=1e-6, atol=1e-7)


def test_all_bad_batch(ckpt, tmp_path):
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=2, num_workers=0)
    res = list(scorer.score_paths([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]))
    assert [r.ok for r in res] == [False, False, False]


def test_empty_inputs_raise_clear_errors(ckpt, tmp_path):
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32")
    with pytest.raises(ValueError, match="no image paths"):
        scorer.score_paths([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        scorer.score_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        scorer.score_folder(tmp_path / "nope")


class _Evil:
    def __reduce__(self):
        return (open, (os.environ["CKAAD_TEST_MARKER"], "w"))


def test_checkpoints_of_the_wrong_kind_or_untrusted_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CKAAD_TEST_MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ckaad_fast.checkpoint", "version": 1, "x": _Evil()}, evil)
    with pytest.raises(ValueError, match="may be unsafe") as e:
        Scorer.from_checkpoint(evil)
    assert not marker.exists()  # nothing was unpickled
    # The message names what the file asked for, and never advises loading it unsafely.
    assert "io.open" in str(e.value) and "will likely succeed" not in str(e.value)

    plain = tmp_path / "state_dict.pt"
    torch.save(tiny_model().state_dict(), plain)
    with pytest.raises(ValueError, match="not a ckaad_fast checkpoint"):
        Scorer.from_checkpoint(plain)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a ckaad_fast checkpoint"):
        Scorer.from_checkpoint(text)
    with pytest.raises(FileNotFoundError):
        Scorer.from_checkpoint(tmp_path / "missing.pt")


def test_cpu_options_are_checked():
    m = tiny_model()
    with pytest.raises(ValueError, match="CUDA"):
        Scorer(m, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA"):
        Scorer(m, dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        Scorer(m, dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        Scorer(m, batch_size=0)
    with pytest.raises(ValueError, match="topk"):
        Scorer(m, topk=SIZE * SIZE + 1)
    with pytest.raises(ValueError, match="device"):
        Scorer(m, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Scorer(m, device="cuda")
    with pytest.raises(TypeError):
        Scorer("not a model")
    s = Scorer(m)
    with pytest.raises(ValueError, match="shape"):
        s(torch.randn(3, SIZE, SIZE))
    with pytest.raises(TypeError, match="floating"):
        s(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))
    # auto: bfloat16 where the CPU multiplies it in hardware, float32 elsewhere; repr says which.
    from ckaad_fast.precision import cpu_has_bf16_matmul

    assert s.dtype == (torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32) and "efficientnet_lite0" in repr(s)
    assert f"dtype={str(s.dtype).removeprefix('torch.')}" in repr(s)
    assert Scorer(m, dtype="float32").dtype == torch.float32


def test_topk_override(model):
    x = torch.randn(2, 3, SIZE, SIZE)
    s1, m = Scorer(model, dtype="float32", topk=1)(x)
    torch.testing.assert_close(s1, m.flatten(1).max(1).values)
    sm, m = Scorer(model, dtype="float32", topk="mean")(x)
    torch.testing.assert_close(sm, m.flatten(1).mean(1))


def test_stream_does_not_leak_inference_mode(ckpt, images):
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=2, num_workers=0)
    modes = [torch.is_inference_mode_enabled() for _ in scorer.score_paths(images[:4], return_maps=False)]
    assert modes == [False] * 4


def test_early_stop_shuts_down_workers(ckpt, images):
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=2, num_workers=1)
    stream = scorer.score_paths(images)
    first = next(stream)
    stream.close()  # must neither hang nor raise
    assert first.ok


def test_on_batch_and_images(ckpt, images):
    scorer = Scorer.from_checkpoint(ckpt, dtype="float32", batch_size=3, num_workers=0)
    calls = []
    res = list(scorer.score_paths(images, return_images=True, on_batch=lambda: calls.append(1)))
    assert len(calls) == 3  # 7 images in batches of 3
    assert res[0].image.shape == (SIZE, SIZE, 3) and res[0].image.dtype == np.uint8
    with Image.open(images[0]) as im:
        expect = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_array_equal(res[0].image, expect)


@pytest.mark.parametrize("kind", ["gray", "rgba", "palette", "16bit", "float"])
def test_decode_matches_load_image(kind, tmp_path, model):
    rng = np.random.default_rng(1)
    if kind == "gray":
        im = Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), "L")
    elif kind == "rgba":
        im = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    elif kind == "palette":
        im = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P")
    elif kind == "16bit":
        im = Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.random((20, 30), dtype=np.float32) * 3, "F")
    path = tmp_path / ("x.tiff" if kind == "float" else "x.png")
    im.save(path)
    cfg = model.config
    ref = load_image(path, SIZE, cfg.mean, cfg.std)
    scorer = Scorer(model, dtype="float32")
    raw = decode_image(path, SIZE)
    got = scorer.normalise(raw[None])[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    (res,) = list(scorer.score_paths([path]))
    s0, _ = scorer(ref[None])
    assert res.ok and res.score == pytest.approx(float(s0[0]), rel=1e-6)


@pytest.mark.skipif(not os.environ.get("CKAAD_FAST_SLOW_TESTS"), reason="torch.compile takes ~1 min on 2 cores; set CKAAD_FAST_SLOW_TESTS=1")
def test_compile_matches_eager(model, images):
    torch._dynamo.reset()
    scorer = Scorer(model, dtype="float32", compile=True, batch_size=4, num_workers=0)
    assert scorer.pad_batches
    with torch._dynamo.config.patch(error_on_recompile=True):  # the padded last batch reuses the graph
        res = list(scorer.score_paths(images))
    s0, m0 = model_forward(model, images)
    np.testing.assert_allclose([r.score for r in res], s0.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([r.map for r in res]), m0.numpy(), rtol=1e-5, atol=1e-6)


def test_mixed_precision_forward_runs_the_fused_ops_on_bf16_features(model):
    """The GPU's autocast path, exercised on the CPU: bf16 features and reconstructions go
    through the fused map and score, which come out in float32 and close to the fp32 result."""
    x = torch.randn(2, 3, SIZE, SIZE)
    s32, m32 = Scorer(model, dtype="float32")(x)
    with torch.inference_mode():  # the detector's own forward, in its contiguous layout
        s16, m16 = model.eval()(x, "bfloat16")
    assert s16.dtype == torch.float32 and m16.dtype == torch.float32
    assert torch.isfinite(m16).all()
    assert ((m16 - m32).norm() / m32.norm()).item() < 0.05


def test_bfloat16_on_the_cpu_scores_like_float32(model, images):
    """bfloat16 on the CPU (autocast, channels_last; auto picks it where the CPU has bf16 units):
    close to float32, maps and scores in float32."""
    cfg = model.config
    x = torch.stack([load_image(p, SIZE, cfg.mean, cfg.std) for p in images])
    s32, m32 = Scorer(model, dtype="float32")(x)
    scorer = Scorer(model, dtype="bfloat16")
    assert "dtype=bfloat16" in repr(scorer)
    s16, m16 = scorer(x)
    assert s16.dtype == m16.dtype == torch.float32
    torch.testing.assert_close(s16, s32, rtol=5e-2, atol=1e-2)
    assert float(((s16 - s32).abs() / s32.abs()).max()) < 5e-2
