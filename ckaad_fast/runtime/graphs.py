"""The scoring forward as graphs of standard operators, for runtimes outside PyTorch.

- :class:`ScoringGraph`: what ``ckaad-fast export`` deploys (uint8 images in; score, normalised
  score, decision and map out; see :mod:`ckaad_fast.export`);
- :class:`EngineGraph`: what the Scorer's ONNX Runtime and OpenVINO engines run (normalised
  float32 images in, score and map out; see :mod:`.engines`);
- :func:`write_onnx`: either one through torch's ONNX exporter, with a dynamic batch.

Both are the detector's own forward (:meth:`ckaad_fast.model.Detector.forward`) with the inference
head's standard-operator form (:mod:`ckaad_fast.head`): no formula of the scoring path is written
here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import ArgumentError
from ..head import DEFAULT_SENSITIVITY, InferenceHead, feature_sizes, normalized_score
from ..model import Detector

__all__ = ["ScoringGraph", "EngineGraph", "write_onnx", "write_engine_onnx", "INPUT_NAME", "OUTPUT_NAMES",
           "MAX_BATCH"]

INPUT_NAME = "image"
#: The largest batch a graph is exported for (fixed, or the bound of a dynamic one).
MAX_BATCH = 4096
OUTPUT_NAMES = ("score", "normalized_score", "is_anomalous", "anomaly_map")


class ScoringGraph(nn.Module):
    """uint8 images -> (score, normalized_score, is_anomalous, anomaly_map), standard ops only.

    The detector's own forward with the inference head's standard-operator form
    (:mod:`ckaad_fast.head`): no formula of the scoring path is written here. The network's
    weights are cast to ``dtype`` (exporters want a graph in one dtype, not autocast); the maps and
    scores are float32. The decision compares the float32 score with the float32 decision
    threshold, exactly as the Scorer does.
    """

    def __init__(self, model: Detector, calibration=None, sensitivity: float = DEFAULT_SENSITIVITY,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.model = model.eval().to(dtype)
        cfg = model.config
        self.image_size = tuple(cfg.image_size)
        self.head = InferenceHead(cfg.sigma, cfg.border, cfg.topk, standard_ops=True,
                                  sizes=(self.image_size, feature_sizes(self.image_size, model.backbone.strides)))
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.calibration = calibration
        self.calibrated = calibration is not None
        cut = calibration.decision_threshold(sensitivity) if calibration is not None else 0.0
        # float32 exactly: decision_threshold is a float32 number.
        self.register_buffer("decision", torch.tensor(cut, dtype=torch.float32))

    def forward(self, image: torch.Tensor):
        x = ((image.to(torch.float32) / 255.0 - self.mean) / self.std).to(self.dtype)
        # precision float32: no autocast; the network runs in its weights' dtype.
        score, amap = self.model(x, torch.float32, self.head)
        if self.calibrated:
            c = self.calibration
            normalized = normalized_score(score, c.image_threshold, c.score_min, c.score_max)
            anomalous = score >= self.decision
        else:
            normalized = score
            anomalous = torch.zeros_like(score, dtype=torch.bool)
        return score, normalized, anomalous, amap


class EngineGraph(nn.Module):
    """What a :class:`~ckaad_fast.scoring.Scorer`'s runtime engine runs: normalised float32 images
    (B, 3, H, W), as the Scorer prepares them for its PyTorch forward (16-bit images included), in;
    ``score`` (B,) and ``anomaly_map`` (B, H, W) out. The detector's own forward with the head's
    standard-operator form at the Scorer's top-k; normalised scores and decisions stay with the
    Scorer's results folder, as for the PyTorch engine."""

    input_dtype = torch.float32
    output_names = ("score", "anomaly_map")

    def __init__(self, model: Detector, topk: int | None):
        super().__init__()
        self.model = model.eval().float()
        cfg = model.config
        self.image_size = tuple(cfg.image_size)
        self.head = InferenceHead(cfg.sigma, cfg.border, topk, standard_ops=True,
                                  sizes=(self.image_size, feature_sizes(self.image_size, model.backbone.strides)))

    def forward(self, image: torch.Tensor):  # the input's name in the graph
        return self.model(image, torch.float32, self.head)


@contextlib.contextmanager
def _quiet_exporter():
    """torch's ONNX exporter prints its progress to stdout: a Scorer building its engine must not
    write into the caller's output."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def write_engine_onnx(model: Detector, topk: int | None, target) -> Path:
    """Export :class:`EngineGraph` of ``model`` at ``topk`` (dynamic batch) to ``target``
    atomically; what the ONNX Runtime and OpenVINO engines of the Scorer load."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        write_onnx(EngineGraph(model, topk), target, None)
    return target


def write_onnx(graph: nn.Module, target: Path, batch: int | None) -> None:
    """Export ``graph`` (a :class:`ScoringGraph` or :class:`EngineGraph`) to ONNX at ``target``
    atomically: a fixed ``batch``, or None for a dynamic one in [1, MAX_BATCH]."""
    if importlib.util.find_spec("onnxscript") is None:  # torch's ONNX exporter needs it
        raise ArgumentError("format", "onnx needs the export extra: pip install 'ckaad_fast[export]'")
    h, w = graph.image_size
    example = torch.zeros((batch or 2, 3, h, w), dtype=getattr(graph, "input_dtype", torch.uint8))
    outputs = list(getattr(graph, "output_names", OUTPUT_NAMES))
    dynamic = None if batch is not None else {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    with torch.no_grad(), atomic_path(target) as tmp:
        program = torch.onnx.export(graph, (example,), input_names=[INPUT_NAME], output_names=outputs,
                                    dynamic_shapes=dynamic, dynamo=True, verbose=False)
        program.save(tmp)
