"""Execution engines behind the Scorer: ONNX Runtime and OpenVINO run the exported graph with the
PyTorch engine's scores, follow the calibration like the precision does, and a results folder
never mixes two engines."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

from ckaad_fast.calibration import Calibration, calibrate, read_calibration, write_calibration  # noqa: E402
from ckaad_fast.cli import main  # noqa: E402
from ckaad_fast.errors import ArgumentError  # noqa: E402
from ckaad_fast.model import load_checkpoint, model_from_checkpoint  # noqa: E402
from ckaad_fast.precision import cpu_has_bf16_matmul  # noqa: E402
from ckaad_fast.runtime import resolve_engine  # noqa: E402
from ckaad_fast.runtime.engines import cache_folder  # noqa: E402
from ckaad_fast.scoring import Scorer  # noqa: E402

from helpers import read_rows, tiny_checkpoint, write_pngs  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*random weights")]
SIZE = 32
RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A cache folder of this module's own: every graph here is exported once, in it."""
    old = os.environ.get("CKAAD_FAST_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["CKAAD_FAST_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CKAAD_FAST_CACHE")
    else:
        os.environ["CKAAD_FAST_CACHE"] = old


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", SIZE)


@pytest.mark.parametrize("engine", RUNTIMES)
def test_a_runtime_engine_scores_like_the_torch_engine(ckpt, engine, tmp_path):
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ref = Scorer.from_checkpoint(ckpt, dtype="float32", engine="torch")
    run = Scorer.from_checkpoint(ckpt, dtype="float32", engine=engine)
    assert run.engine == engine and run.precision == "float32"
    s0, m0 = ref(x)
    s, m = run(x)
    # The same float32 arithmetic in another order: a few float32 roundings per term of sums of
    # at most C*9 terms (C <= 40 here) -> far below 1e-4 relative; a wrong graph is off by O(1).
    torch.testing.assert_close(s, s0, rtol=1e-4, atol=0)
    torch.testing.assert_close(m, m0, rtol=1e-4, atol=1e-6 * float(m0.abs().max()))
    # Files too, a 16-bit one included (the Scorer normalises; the engine gets float32 images).
    folder = write_pngs(tmp_path / "in", 3, 1, SIZE)
    arr = (np.random.default_rng(2).random((SIZE, SIZE)) * 65535).astype(np.uint16)
    Image.fromarray(arr).save(folder / "scan16.png")
    a = {r.path: r.score for r in ref.score_folder(folder)}
    b = {r.path: r.score for r in run.score_folder(folder)}
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) for k in a)


def test_the_graph_is_exported_once_and_kept(ckpt, cache):
    Scorer.from_checkpoint(ckpt, dtype="float32", engine="onnxruntime")
    graphs = sorted(cache.rglob("engine.onnx"))
    assert graphs and all(str(g).startswith(str(cache_folder())) for g in graphs)
    stamp = [g.stat().st_mtime_ns for g in graphs]
    Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino")  # the same graph, loaded
    assert [g.stat().st_mtime_ns for g in sorted(cache.rglob("engine.onnx"))] == stamp


def test_a_scorer_of_a_graph_at_hand_builds_no_network(ckpt, tmp_path):
    from ckaad_fast.model import checkpoint_fingerprint, fingerprint

    # The cache key computed from the checkpoint's tensors is the built model's fingerprint, for a
    # training checkpoint with a discriminator too (its weights are left out of both).
    trained = tiny_checkpoint(tmp_path / "patch.pt", SIZE, strategy="cka_patch")
    for path in (ckpt, trained):
        raw = load_checkpoint(path)
        assert checkpoint_fingerprint(raw) == fingerprint(model_from_checkpoint(raw))
    built = Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino")  # exports, or finds, the graph
    again = Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino")
    assert again.model is None and again.fingerprint() == built.fingerprint()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again(x), built(x), rtol=0, atol=0)
    # Whatever runs the network itself builds it: the torch engine, or a top-k never exported.
    assert Scorer.from_checkpoint(ckpt, dtype="float32", engine="torch").model is not None
    assert Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino", topk=3).model is not None


def test_auto_picks_by_the_documented_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_engine("auto", cpu, torch.float32) == "openvino"  # both runtimes installed here
    assert resolve_engine("auto", gpu, torch.float32) == "torch"
    # bfloat16: OpenVINO where the CPU multiplies it, else torch (which emulates it as asked).
    assert resolve_engine("auto", cpu, torch.bfloat16) == ("openvino" if cpu_has_bf16_matmul() else "torch")
    for engine, dtype, words in (("onnxruntime", torch.bfloat16, "float32 only"), ("openvino", torch.float32, None),
                                 ("nope", torch.float32, "must be one of")):
        if words is None:
            with pytest.raises(ArgumentError, match="on the CPU here"):
                resolve_engine(engine, gpu, dtype)
            continue
        with pytest.raises(ArgumentError, match=words) as e:
            resolve_engine(engine, cpu, dtype)
        assert e.value.name == "engine"


def test_compile_is_the_torch_engines(ckpt):
    with pytest.raises(ArgumentError, match="torch engine"):
        Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino", compile=True)
    assert Scorer.from_checkpoint(ckpt, dtype="float32", engine="auto", compile=True).engine == "torch"


def test_the_calibration_records_its_engine_and_the_scorer_follows(ckpt, tmp_path):
    model = model_from_checkpoint(ckpt)
    from ckaad_fast.calibration import normal_folder_set

    data = normal_folder_set(write_pngs(tmp_path / "good", 10, 3, SIZE), SIZE, model.config.mean, model.config.std)
    cal = calibrate(model, data, target_fpr=0.1, engine="onnxruntime")
    assert cal.engine == "onnxruntime" and "by onnxruntime" in cal.describe()
    path = write_calibration(ckpt, cal, out=tmp_path / "cal.pt")
    assert Scorer.from_checkpoint(path).engine == "onnxruntime"
    with pytest.warns(UserWarning, match="calibrated with onnxruntime"):
        assert Scorer.from_checkpoint(path, engine="torch").engine == "torch"
    # Calibrations older than the record were torch's; an uncalibrated model runs on torch.
    old = Calibration(image_threshold=1.0, score_min=0.0, score_max=2.0, method="f1", num_normal=3, num_anomalous=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Scorer.from_checkpoint(write_calibration(ckpt, old, out=tmp_path / "old.pt")).engine == "torch"
    assert Scorer.from_checkpoint(ckpt).engine == "torch"
    with pytest.raises(ValueError, match="engine"):
        Calibration(image_threshold=1.0, score_min=0.0, score_max=2.0, method="f1", engine="auto")


def test_calibrate_then_score_keeps_the_promise_and_a_resume_refuses_another_engine(ckpt, tmp_path, capsys):
    ck = tmp_path / "m.pt"
    ck.write_bytes(ckpt.read_bytes())
    normal = write_pngs(tmp_path / "good", 40, 4, SIZE)
    assert main(["calibrate", "--checkpoint", str(ck), "--normal", str(normal), "--target-fpr", "0.1", "--quiet"]) == 0
    cal = read_calibration(load_checkpoint(ck))
    assert cal.engine == "openvino"  # auto, on this CPU in float32
    out = tmp_path / "out"
    assert main(["score", "--checkpoint", str(ck), "--input", str(normal), "--out", str(out), "--num-workers", "0",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["engine"] == "openvino"
    flagged = sum(r["is_anomalous"] == "True" for r in read_rows(out))
    assert flagged == int(0.1 * 40)  # exactly the promised share of the calibration set
    capsys.readouterr()
    with pytest.warns(UserWarning, match="calibrated with openvino"):
        rc = main(["score", "--checkpoint", str(ck), "--input", str(normal), "--out", str(out), "--num-workers", "0",
                   "--no-progress", "--resume", "--engine", "torch"])
    assert rc == 2
    assert "engine 'openvino' there, 'torch' now" in capsys.readouterr().err


# -- the cache is bound to its model ---------------------------------------------------------------
def _graph_of(path):
    from ckaad_fast.model import checkpoint_fingerprint
    from ckaad_fast.runtime.engines import cached_engine_graph

    raw = load_checkpoint(path)
    return cached_engine_graph(checkpoint_fingerprint(raw), model_from_checkpoint(raw).config.topk)


@pytest.mark.parametrize("damage", ["another model's graph", "edited", "truncated", "no record"])
def test_a_wrong_cached_graph_is_exported_again_with_one_warning(damage, tmp_path):
    from ckaad_fast.runtime.engines import GRAPH_RECORD, CachedGraphWarning

    ckpt = tiny_checkpoint(tmp_path / "mine.pt", SIZE, seed=11)
    other = tiny_checkpoint(tmp_path / "other.pt", SIZE, seed=12)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    truth = Scorer.from_checkpoint(ckpt, dtype="float32", engine="torch")(x)[0]
    Scorer.from_checkpoint(other, dtype="float32", engine="openvino")
    Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino")
    graph, foreign = _graph_of(ckpt), _graph_of(other)
    if damage == "another model's graph":  # the graph and its record, copied over
        graph.write_bytes(foreign.read_bytes())
        graph.with_name(GRAPH_RECORD).write_bytes(foreign.with_name(GRAPH_RECORD).read_bytes())
    elif damage == "edited":  # another model's weights under this model's record
        graph.write_bytes(foreign.read_bytes())
    elif damage == "truncated":
        data = graph.read_bytes()
        graph.write_bytes(data[: len(data) // 2])
    else:  # an export interrupted before its record was written
        graph.with_name(GRAPH_RECORD).unlink()
    with pytest.warns(CachedGraphWarning, match=f"{graph.name}.*exporting it again") as w:
        scorer = Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino")
    assert len(w) == 1 and str(w[0].message).count("\n") == 0
    torch.testing.assert_close(scorer(x)[0], truth, rtol=1e-4, atol=0)  # this model's scores again
    with warnings.catch_warnings():
        warnings.simplefilter("error", CachedGraphWarning)
        again = Scorer.from_checkpoint(ckpt, dtype="float32", engine="openvino")  # whole now: no warning
    assert again.model is None


def test_left_over_temporaries_of_killed_exports_are_removed(tmp_path):
    import time

    ckpt = tiny_checkpoint(tmp_path / "m.pt", SIZE, seed=13)
    graph = _graph_of(ckpt)
    graph.parent.mkdir(parents=True, exist_ok=True)
    old = graph.parent / ".engine.onnx.abcd1234.tmp"
    young = graph.parent / ".engine.onnx.efgh5678.tmp"
    for p in (old, young):
        p.write_bytes(b"partial")
    past = time.time() - 7200
    os.utime(old, (past, past))
    Scorer.from_checkpoint(ckpt, dtype="float32", engine="onnxruntime")
    assert not old.exists() and young.exists()  # a young one may be another process's export


def test_an_unwritable_cache_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", SIZE, seed=14)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CKAAD_FAST_CACHE", str(blocked))
    folder = write_pngs(tmp_path / "in", 2, 0, SIZE)
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(folder), "--out", str(tmp_path / "o"),
                 "--engine", "openvino", "--dtype", "float32", "--num-workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "CKAAD_FAST_CACHE" in err and str(blocked) in err and err.count("\n") == 0
