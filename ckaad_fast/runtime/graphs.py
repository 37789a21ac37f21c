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

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import ArgumentError
from ..head import DEFAULT_SENSITIVITY, InferenceHead, decide, feature_sizes, normalized_score
from ..data.images import normalise_pixels
from ..model import Detector

__all__ = ["ScoringGraph", "EngineGraph", "standard_ops_head", "write_onnx", "write_engine_onnx", "dynamic_batch",
           "GRAPH_PARTS", "INPUT_NAME", "SENSITIVITY_NAME", "OUTPUT_NAMES", "MAX_BATCH"]

INPUT_NAME = "image"
#: The exported graph's second input: the sensitivity to decide at (float64; see ScoringGraph).
SENSITIVITY_NAME = "sensitivity"
#: The largest batch a graph is exported for (fixed, or the bound of a dynamic one).
MAX_BATCH = 4096
OUTPUT_NAMES = ("score", "normalized_score", "is_anomalous", "anomaly_map")


def standard_ops_head(model: Detector, topk: int | None) -> InferenceHead:
    """``model``'s inference head in its standard-operator form at ``topk``, its upsampling-and-blur
    matrices as buffers (what a tracer needs): the head of both graphs."""
    cfg = model.config
    size = tuple(cfg.image_size)
    return InferenceHead(cfg.sigma, cfg.border, topk, standard_ops=True,
                         sizes=(size, feature_sizes(size, model.backbone.strides)))


class ScoringGraph(nn.Module):
    """(uint8 images, sensitivity) -> (score, normalized_score, is_anomalous, anomaly_map),
    standard ops only.

    The detector's own forward with the inference head's standard-operator form
    (:mod:`ckaad_fast.head`): no formula of the scoring path is written here. The network's
    weights are cast to ``dtype`` (exporters want a graph in one dtype, not autocast); the maps and
    scores are float32. The decision is the head's :func:`~ckaad_fast.head.decide` at the
    ``sensitivity`` input (float64, one value or one per image; ``sensitivity`` given here is its
    default), so a line moves its operating point without exporting again: exactly the Scorer's
    decision at every sensitivity.
    """

    input_names = (INPUT_NAME, SENSITIVITY_NAME)

    def __init__(self, model: Detector, calibration=None, sensitivity: float = DEFAULT_SENSITIVITY,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.model = model.eval().to(dtype)
        cfg = model.config
        self.image_size = tuple(cfg.image_size)
        self.head = standard_ops_head(model, cfg.topk)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.calibration = calibration
        self.calibrated = calibration is not None
        self.sensitivity = float(sensitivity)
        self.register_buffer("default_sensitivity", torch.tensor([self.sensitivity], dtype=torch.float64))

    def example_inputs(self, batch: int, device="cpu") -> tuple[torch.Tensor, ...]:
        h, w = self.image_size
        return (torch.zeros((batch, 3, h, w), dtype=torch.uint8, device=device),
                torch.full((1,), self.sensitivity, dtype=torch.float64, device=device))

    def forward(self, image: torch.Tensor, sensitivity: torch.Tensor | None = None):
        x = normalise_pixels(image, self.mean, self.std).to(self.dtype)
        # precision float32: no autocast; the network runs in its weights' dtype.
        score, amap = self.model(x, torch.float32, self.head)
        if self.calibrated:
            c = self.calibration
            normalized = normalized_score(score, c.image_threshold, c.score_min, c.score_max)
            s = self.default_sensitivity if sensitivity is None else sensitivity
            anomalous = decide(score, c.image_threshold, c.score_min, c.score_max, s)
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

    input_names = (INPUT_NAME,)
    output_names = ("score", "anomaly_map")

    def __init__(self, model: Detector, topk: int | None):
        super().__init__()
        self.model = model.eval().float()
        cfg = model.config
        self.image_size = tuple(cfg.image_size)
        self.head = standard_ops_head(model, topk)

    def example_inputs(self, batch: int, device="cpu") -> tuple[torch.Tensor, ...]:
        return (torch.zeros((batch, 3, *self.image_size), dtype=torch.float32, device=device),)

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
    _name_nodes_by_module(target)
    return target


#: The parts of the detector whose nodes the engine graph names ``part/...`` (see below); the
#: rest (the head, and the outputs) is named ``head/...``.
GRAPH_PARTS = ("backbone", "autoencoder")


def _name_nodes_by_module(path: Path) -> None:
    """Prefix every node's name with the detector's part it computes (``backbone/``,
    ``autoencoder/``, ``head/``), read from the exporter's record of module scopes, so that a
    quantizer can be told which parts to quantize (:mod:`.quantize`) by name."""
    import ast

    import onnx

    model = onnx.load(path)
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        part = next((p for p in GRAPH_PARTS if f"model.{p}" in scopes), "head")
        node.name = f"{part}/{node.name}"
    with atomic_path(path) as tmp:
        onnx.save(model, tmp)


def dynamic_batch(graph: nn.Module) -> dict:
    """torch.export's dynamic shapes of ``graph``'s inputs: the images' batch dimension in
    [1, MAX_BATCH]; the sensitivity is one value for the call (shape [1]). (A per-image
    sensitivity sharing the batch dimension would not let ONNX Runtime use the [1] default: it
    holds one dimension name to one size.)"""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {name: ({0: batch} if name == INPUT_NAME else None) for name in graph.input_names}


def write_onnx(graph: nn.Module, target: Path, batch: int | None) -> None:
    """Export ``graph`` (a :class:`ScoringGraph` or :class:`EngineGraph`) to ONNX at ``target``
    atomically: a fixed ``batch``, or None for a dynamic one in [1, MAX_BATCH]. A
    :class:`ScoringGraph`'s ``sensitivity`` input gets its default as an initializer of the same
    name, so ONNX Runtime runs the graph with the image alone and takes a sensitivity when given
    (ONNX's rule for inputs with initializers)."""
    if importlib.util.find_spec("onnxscript") is None:  # torch's ONNX exporter needs it
        raise ArgumentError("format", "onnx needs the export extra: pip install 'ckaad_fast[export]'")
    outputs = list(getattr(graph, "output_names", OUTPUT_NAMES))
    dynamic = None if batch is not None else dynamic_batch(graph)
    with torch.no_grad(), atomic_path(target) as tmp:
        program = torch.onnx.export(graph, graph.example_inputs(batch or 2), input_names=list(graph.input_names),
                                    output_names=outputs, dynamic_shapes=dynamic, dynamo=True, verbose=False)
        program.save(tmp)
        if SENSITIVITY_NAME in graph.input_names:
            _default_input(tmp, SENSITIVITY_NAME, graph.sensitivity)


def _default_input(path, name: str, value: float) -> None:
    """Give the graph input ``name`` the default ``[value]`` (float64): an initializer of its name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    model.graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.float64), name))
    onnx.save(model, path)
