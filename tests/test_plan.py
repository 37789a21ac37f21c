"""The execution plan: one rule (what was asked, else the calibration's choice, else the
purpose's default) and one capability table decide device, precision, engine and top-k for
calibrate, the Scorer, eval and export; the command line shows the plan's defaults."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ckaad_fast.calibration import Calibration
from ckaad_fast.cli import main
from ckaad_fast.errors import ArgumentError
from ckaad_fast.model import DEFAULT_TOPK, ModelConfig
from ckaad_fast.precision import cpu_has_bf16_matmul
from ckaad_fast.runtime import plan

CPU = torch.device("cpu")


def _cal(precision="float32", engine="torch", device="cpu"):
    return Calibration(image_threshold=0.5, score_min=0.1, score_max=0.9, method="fpr", target_fpr=0.1,
                       precision=precision, engine=engine, device=device)


def test_precision_asked_else_calibrated_else_default():
    assert plan.plan_precision("score", "float32", None, CPU) == torch.float32
    # The calibration's when nothing is asked, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan.plan_precision("score", None, _cal("float32"), CPU) == torch.float32
    # The purpose's default without a calibration: score "auto", calibrate float32.
    auto = torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    assert plan.plan_precision("score", None, None, CPU) == auto
    assert plan.plan_precision("calibrate", None, None, CPU) == torch.float32
    assert plan.plan_precision("eval", None, None, CPU) == torch.float32
    # A calibration's precision wins over the default (bfloat16 may be emulated here: warned).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert plan.plan_precision("eval", None, _cal("bfloat16"), CPU) == torch.bfloat16
        assert plan.plan_precision("score", None, _cal("float32"), CPU) == torch.float32
    # Another precision than the calibration's is honoured, and warned about.
    with pytest.warns(UserWarning, match="scoring in float32 a model calibrated in bfloat16"):
        assert plan.plan_precision("score", "float32", _cal("bfloat16"), CPU) == torch.float32
    with pytest.raises(ArgumentError, match="dtype: float16 needs a CUDA device"):
        plan.plan_precision("score", "float16", None, CPU)


def test_engine_asked_else_calibrated_else_default():
    assert plan.plan_engine("score", None, None, CPU, torch.float32) == "torch"  # score's default
    assert plan.plan_engine("eval", None, None, CPU, torch.float32) == "torch"
    calibrated = plan.plan_engine("calibrate", None, None, CPU, torch.float32)  # calibrate: auto
    assert calibrated == plan.resolve_engine("auto", CPU, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan.plan_engine("score", None, _cal(engine="torch"), CPU, torch.float32) == "torch"
    assert plan.plan_engine("score", "torch", None, CPU, torch.float32, torch_only=True) == "torch"
    # compile or CUDA graphs take torch over a calibration's engine, and say so.
    if plan.engine_installed("openvino"):
        with pytest.warns(UserWarning, match="scoring with the torch engine a model calibrated with openvino"):
            assert plan.plan_engine("score", None, _cal(engine="openvino"), CPU, torch.float32, True) == "torch"
    with pytest.raises(ArgumentError, match="engine: must be one of"):
        plan.plan_engine("score", "tensorrt", None, CPU, torch.float32)


def test_the_capability_table_decides_what_runs_where():
    assert plan.engine_supports("torch", "cuda", torch.float16)
    assert not plan.engine_supports("torch", "cpu", torch.int8)
    assert plan.engine_supports("onnxruntime", "cpu", torch.float32)
    assert not plan.engine_supports("onnxruntime", "cpu", torch.bfloat16)
    assert not plan.engine_supports("onnxruntime", "cuda", torch.float32)
    assert plan.engine_supports("openvino", "cpu", torch.int8)
    # OpenVINO's bfloat16 only where the CPU multiplies it (it would compute float32 elsewhere).
    assert plan.engine_supports("openvino", "cpu", torch.bfloat16) == cpu_has_bf16_matmul()
    # Every engine of the table is one the plan can name, and the other way round.
    assert set(plan.CAPABILITIES) == set(plan.ENGINES) - {"auto"}
    assert set(plan.RUNTIME_ENGINES) < set(plan.CAPABILITIES)


def test_topk_asked_else_the_models():
    config = ModelConfig(backbone="resnet18", layers=(2, 3), image_size=(16, 16))
    assert config.topk == DEFAULT_TOPK
    assert plan.plan_topk(None, config) == DEFAULT_TOPK
    assert plan.plan_topk("mean", config) is None
    assert plan.plan_topk(7, config) == 7
    for bad in (0, 257, True, "max"):
        with pytest.raises(ArgumentError, match="topk"):
            plan.plan_topk(bad, config)


def test_export_precision_and_device():
    assert plan.plan_export("onnx", None, None, None) == ("float32", "cpu")
    assert plan.plan_export("openvino", None, None, _cal("int8", "openvino"))[0] == "int8"
    assert plan.plan_export("onnx", None, None, _cal("float32"))[0] == "float32"
    assert plan.plan_export("pt2", "bf16", None, None) == ("bfloat16", "cpu")
    # Before the checkpoint is read, only what was asked is checked.
    assert plan.plan_export("onnx", None, None) == (None, "cpu")
    for fmt, dtype, message in (("onnx", "bfloat16", "bfloat16 graphs are for --format pt2"),
                                ("onnx", "int8", "int8 graphs are for --format openvino"),
                                ("pt2", "auto", "must name one precision")):
        with pytest.raises(ArgumentError, match=message):
            plan.plan_export(fmt, dtype, None)
    with pytest.raises(ArgumentError, match="int8 needs a checkpoint calibrated in int8"):
        plan.plan_export("openvino", "int8", None, None)
    with pytest.raises(ArgumentError, match="device: cuda is for --format pt2"):
        plan.plan_export("onnx", None, "cuda")
    with pytest.raises(ArgumentError, match="device: must be cpu or cuda"):
        plan.plan_export("onnx", None, "tpu")
    with pytest.warns(UserWarning, match="exporting in float32 a model calibrated in bfloat16"):
        plan.plan_export("onnx", None, None, _cal("bfloat16"))


def test_devices_follow_the_purpose():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert plan.device_name("score") == expected and plan.device_name("calibrate") == expected
    assert plan.device_name("export") == "cpu"
    assert plan.device_name("score", "cpu") == "cpu"
    assert plan.plan_device("eval", "cpu") == CPU


@pytest.mark.parametrize("command, option, shown", [
    ("calibrate", "--dtype", "default: float32"),
    ("calibrate", "--engine", "default: auto"),
    ("calibrate", "--target-fpr", "default: 0.01"),
    ("train", "--calibrate-dtype", "default: float32"),
    ("eval", "--engine", "else torch"),
    ("export", "--device", "default: cpu"),
])
def test_the_help_shows_the_plans_defaults(command, option, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text[text.index(option + " ", text.index("options:")):]
    assert shown in after[:900], after[:900]


def test_a_changed_default_reaches_the_help(monkeypatch, capsys):
    # The help reads the plan: change the plan and the help follows (it restates nothing).
    import argparse

    import ckaad_fast.cli.calibrate as cli_calibrate

    monkeypatch.setitem(plan.DEFAULTS, "calibrate", {**plan.DEFAULTS["calibrate"], "engine": "onnxruntime"})
    parser = argparse.ArgumentParser()
    cli_calibrate.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--help"])
    assert "(default: onnxruntime)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_eval_judges_a_calibrated_checkpoint_as_deployed(tmp_path, monkeypatch):
    """eval follows the calibration's precision and engine (the plan's rule), and says which."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    from helpers import tiny_checkpoint

    from ckaad_fast.model import model_from_checkpoint
    from ckaad_fast.runtime.planned import evaluate_planned

    monkeypatch.setenv("CKAAD_FAST_CACHE", str(tmp_path / "cache"))
    model = model_from_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt", 32))
    rng = np.random.default_rng(0)
    data = [(torch.from_numpy(rng.standard_normal((3, 32, 32)).astype(np.float32)), i % 2, f"{i}.png")
            for i in range(8)]
    deployed = evaluate_planned(model, data, _cal("float32", "openvino"), device="cpu", progress=False)
    assert deployed["plan"] == {"device": "cpu", "precision": "float32", "engine": "openvino"}
    trained = evaluate_planned(model, data, None, device="cpu", progress=False)
    assert trained["plan"]["engine"] == "torch"
    # The same float32 forward by two engines: the same ranking, to float32 rounding.
    assert abs(deployed["image_auroc"] - trained["image_auroc"]) < 1e-9
