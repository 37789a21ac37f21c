"""INT8: a quantized copy of the engine graph, made with NNCF and run by OpenVINO on the CPU.

:func:`quantize_graph` takes the engine graph of a model (:class:`.graphs.EngineGraph`: normalised
images in, score and map out), inserts NNCF's quantizers in the parts ``scope`` names, and sets
their ranges on a calibration set's normal images (post-training quantization). With a labelled
check set (normal and anomalous images held out from training) it runs NNCF's accuracy-controlled
quantization instead: operations are put back into float32, the most harmful first, until the
image AUROC on the check set drops by at most ``max_auroc_drop`` (absolute); a bound it cannot
meet is refused, not written.

What is quantized, and why (measured on the demo's EfficientNet-Lite0 model, 128², docs/BENCHMARKS.md):

- never the head (the map and score arithmetic and the upsampling-and-blur matrices): quantized,
  the score keeps 256 levels, and OpenVINO's CPU plugin refuses to compile the matrices;
- ``scope="autoencoder"`` (the default): the auto-encoder's convolutions; the backbone stays
  float32. Scores moved by at most 2.6% and the test AUROC did not move;
- ``scope="network"``: the backbone too. Faster, but the score (one minus the cosine of the
  backbone's features and their reconstruction) is a small difference of large quantities and
  the backbone's quantization noise lands on it whole: scores moved by up to 20% and plain
  post-training quantization lost 5 points of AUROC. Use it with a check set.

The result, a :class:`QuantizedGraph`, is OpenVINO IR in memory (xml text and weights) with the
report of what was done and measured; a calibration in int8 (:mod:`ckaad_fast.calibration`)
picks its threshold on the quantized graph's scores and stores the graph in the checkpoint, so the
Scorer and the exported model decide as it promised.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import warnings
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArgumentError
from ..runtimes import compile_openvino
from ..metrics import image_auroc
from ..head import normalized_score
from ..data.images import normalise_pixels
from .engines import cache_folder, engine_graph_file
from .graphs import GRAPH_PARTS, INPUT_NAME, OUTPUT_NAMES

__all__ = ["QuantizedGraph", "quantize_graph", "int8_scoring_model", "SCOPES", "DEFAULT_SCOPE",
           "DEFAULT_MAX_AUROC_DROP"]

#: What may be quantized (see the module).
SCOPES = ("autoencoder", "network")
DEFAULT_SCOPE = "autoencoder"
#: The accuracy-controlled mode's default bound on the check set's image AUROC drop (half a point).
DEFAULT_MAX_AUROC_DROP = 0.005
# The parts of the engine graph each scope quantizes (its nodes are named "part/...", graphs.GRAPH_PARTS);
# every other node is left in float.
_QUANTIZED_PARTS = {"autoencoder": ("autoencoder",), "network": GRAPH_PARTS}
_BATCH = 8


@dataclass
class QuantizedGraph:
    """An int8 engine graph as OpenVINO IR in memory, for the model ``model_sha256`` at ``topk``."""

    xml: str
    weights: bytes
    model_sha256: str
    topk: int | None
    report: dict = field(default_factory=dict)

    def checksum(self) -> str:
        return hashlib.sha256(self.xml.encode() + self.weights).hexdigest()

    def to_checkpoint(self) -> dict:
        """What a checkpoint stores (plain types: ``torch.load(weights_only=True)`` reads it)."""
        return {"xml": self.xml, "weights": self.weights, "sha256": self.checksum(),
                "model_sha256": self.model_sha256, "topk": self.topk, "report": dict(self.report)}

    @classmethod
    def from_checkpoint(cls, raw: dict) -> "QuantizedGraph":
        try:
            graph = cls(str(raw["xml"]), bytes(raw["weights"]), str(raw["model_sha256"]), raw["topk"],
                        dict(raw.get("report") or {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"the checkpoint's int8 graph is incomplete ({e})") from None
        if graph.checksum() != raw.get("sha256"):
            raise ValueError("the checkpoint's int8 graph does not match its checksum: the file is damaged; "
                             "calibrate in int8 again")
        return graph

    def check_for(self, fingerprint: str, topk) -> None:
        """Refuse to run for another model or another top-k than it was quantized for."""
        if fingerprint != self.model_sha256:
            raise ArgumentError("checkpoint", "its int8 graph was quantized for other weights than the checkpoint "
                                              "holds: calibrate in int8 again")
        if topk != self.topk:
            raise ArgumentError("topk", f"the int8 graph scores with top-k {self.topk} (the calibration's); "
                                        f"got {topk}: leave topk out, or calibrate again")

    def openvino_model(self):
        import openvino as ov

        return ov.Core().read_model(model=self.xml.encode(), weights=self.weights)


def _scores(compiled, images: list[np.ndarray]) -> np.ndarray:
    out = [np.asarray(compiled(np.stack(images[i:i + _BATCH]))[0], dtype=np.float64)
           for i in range(0, len(images), _BATCH)]
    return np.concatenate(out)


def _auroc(labels, scores) -> float | None:
    labels = np.asarray(labels)
    return float(image_auroc(labels, scores)) if 0 < labels.sum() < labels.size else None


@contextlib.contextmanager
def _quiet(nncf):
    """NNCF logs every node it skips and draws progress bars: a calibration prints its own summary."""
    level = logging.getLogger("nncf").level
    nncf.set_log_level(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        nncf.set_log_level(level)


def _quantize(nncf, float_model, data, n, ignored, check_images, check_labels, max_auroc_drop, controlled):
    if not controlled:
        return nncf.quantize(float_model, data, subset_size=n, ignored_scope=ignored)

    def validate(compiled, items):
        items = list(items)
        labels = [label for _, label in items]
        outs = [np.asarray(compiled(x[None])[0], dtype=np.float64) for x, _ in items]
        # NNCF ranks the operations to put back by how much each changes these outputs.
        return _auroc(labels, np.concatenate(outs)) or 0.0, [[o] for o in outs]

    return nncf.quantize_with_accuracy_control(
        float_model, data, nncf.Dataset(list(zip(check_images, check_labels)), lambda item: item[0][None]),
        validate, max_drop=float(max_auroc_drop), drop_type=nncf.DropType.ABSOLUTE, subset_size=n,
        ignored_scope=ignored)


class CheckSetWarning(UserWarning):
    """The int8 check set does not look like what it was said to be."""


def check_resolves(n_normal: int, n_anomalous: int, max_auroc_drop: float) -> None:
    """Refuse a check set too small to measure an AUROC drop of ``max_auroc_drop``: its AUROC moves
    in steps of 1 / (normal x anomalous pairs), so it needs at least 1 / max_auroc_drop pairs (200
    at the default half point), and at least 5 images of each kind."""
    need = math.ceil(1 / max_auroc_drop) if max_auroc_drop > 0 else math.inf
    if n_normal < MIN_CHECK_IMAGES or n_anomalous < MIN_CHECK_IMAGES or n_normal * n_anomalous < need:
        raise ArgumentError("check", f"an int8 check set of {n_normal} normal and {n_anomalous} anomalous images "
                                     f"cannot measure an AUROC drop of {max_auroc_drop:g}: its AUROC moves in steps "
                                     f"of 1/{n_normal * n_anomalous}; it needs at least {MIN_CHECK_IMAGES} of each "
                                     f"and {need} normal x anomalous pairs")


#: The fewest images of each kind an int8 check set may have.
MIN_CHECK_IMAGES = 5


def quantize_graph(model, fingerprint: str, topk, images, check=None, max_auroc_drop: float = DEFAULT_MAX_AUROC_DROP,
                   scope: str = DEFAULT_SCOPE) -> QuantizedGraph:
    """Quantize ``model``'s engine graph at ``topk`` (see the module). ``images``: the calibration
    set's normal images, normalised float32 arrays (3, H, W); ``check``: None, or ``(images,
    labels)`` held out from training, with both labels for the accuracy-controlled mode."""
    if scope not in SCOPES:
        raise ArgumentError("int8_scope", f"must be one of {SCOPES}, got {scope!r}")
    if not (isinstance(max_auroc_drop, (int, float)) and 0 <= max_auroc_drop < 1):
        raise ArgumentError("max_auroc_drop", f"must lie in [0, 1), got {max_auroc_drop!r}")
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise ArgumentError("precision", "int8 needs NNCF and OpenVINO: pip install 'ckaad_fast[export]'") from None
    images = [np.ascontiguousarray(x, dtype=np.float32) for x in images]
    if not images:
        raise ArgumentError("data", "int8 needs normal images to set its quantization ranges; the set has none")
    check_images, check_labels = ([], []) if check is None else (list(check[0]), [int(v) for v in check[1]])
    check_images = [np.ascontiguousarray(x, dtype=np.float32) for x in check_images]
    controlled = 0 < sum(check_labels) < len(check_labels)
    if controlled:
        check_resolves(len(check_labels) - sum(check_labels), sum(check_labels), max_auroc_drop)
    float_model = ov.Core().read_model(str(engine_graph_file(model, fingerprint, topk)))
    ignored = nncf.IgnoredScope(patterns=[f"^(?!({'|'.join(_QUANTIZED_PARTS[scope])})/)"], validate=False)
    data = nncf.Dataset([x[None] for x in images])
    with _quiet(nncf):
        quantized = _quantize(nncf, float_model, data, len(images), ignored, check_images, check_labels,
                              max_auroc_drop, controlled)
    # What it did, measured on the check set (else on the calibration images themselves).
    probe, labels = (check_images, check_labels) if check_images else (images, [0] * len(images))
    before, after = _scores(compile_openvino(float_model), probe), _scores(compile_openvino(quantized), probe)
    change = np.abs(after - before) / np.maximum(np.abs(before), 1e-12)
    auroc_f32, auroc_i8 = _auroc(labels, before), _auroc(labels, after)
    drop = None if auroc_f32 is None else auroc_f32 - auroc_i8
    report = {
        "scope": scope,
        "method": "accuracy-controlled" if controlled else "post-training",
        "calibration_images": len(images),
        "measured_on": "check set" if check_images else "calibration images",
        "check_normal": len(check_labels) - sum(check_labels), "check_anomalous": sum(check_labels),
        "auroc_float32": auroc_f32, "auroc_int8": auroc_i8, "auroc_drop": drop,
        "max_auroc_drop": float(max_auroc_drop) if controlled else None,
        "relative_score_change": {"median": float(np.median(change)), "max": float(change.max())},
        "quantizers": sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops()),
        "nncf": nncf.__version__, "openvino": ov.get_version(),
    }
    if auroc_f32 is not None and auroc_f32 < 0.5:
        warnings.warn(f"the int8 check set's float32 AUROC is {auroc_f32:.2f}, below chance: its normal images score "
                      "higher than its anomalous ones (are the normal and anomalous folders swapped, or mislabelled?)",
                      CheckSetWarning, stacklevel=2)
    if report["quantizers"] == 0:
        raise ArgumentError("int8_scope", f"NNCF inserted no quantizer into the {scope} of the engine graph: its "
                                          "nodes do not carry the detector's part names, so int8 would change "
                                          "nothing; delete the model's folder in the engine cache "
                                          f"({cache_folder()}) and calibrate again")
    if controlled and drop > max_auroc_drop + 1e-12:
        raise ArgumentError("max_auroc_drop", f"int8 loses {drop:.4f} AUROC on the check set ({auroc_f32:.4f} -> "
                                              f"{auroc_i8:.4f}) even after NNCF put operations back into float32; "
                                              f"allowed {max_auroc_drop:g}: quantize less (int8_scope autoencoder), "
                                              "allow more, or stay in float32")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "int8.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        return QuantizedGraph(xml.read_text(), xml.with_suffix(".bin").read_bytes(), fingerprint, topk, report)


def int8_scoring_model(quantized: QuantizedGraph, calibration, sensitivity: float, mean, std):
    """The deployable int8 model: uint8 NCHW RGB in; ``score``, ``normalized_score``,
    ``is_anomalous`` (at ``sensitivity``: the raw score against the calibration's float32
    decision threshold, the comparison every path makes) and ``anomaly_map`` out, the exported
    float32 graph's interface.

    The pixels are normalised by a lookup table of the 256 values per channel that the Scorer's
    own normalisation gives (``(x / 255 - mean) / std`` in torch's float32), not by arithmetic:
    OpenVINO would fold the division into a multiplication and round differently, and an int8
    quantizer turns a one-ulp difference into a whole quantization step now and then (measured:
    scores 7e-4 apart in the median). With the table the quantized graph sees the very input the
    Scorer gives it, and the two score alike."""
    import openvino as ov
    import openvino.opset13 as ops
    import torch

    model = quantized.openvino_model()
    (inner,) = model.get_parameters()
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256)
    table = normalise_pixels(pixels, torch.tensor(mean, dtype=torch.float32).view(1, 3, 1),
                             torch.tensor(std, dtype=torch.float32).view(1, 3, 1)).reshape(-1).numpy()
    image = ops.parameter(ov.PartialShape([-1, 3, *inner.get_partial_shape()[2:]]), ov.Type.u8, name=INPUT_NAME)
    image.output(0).get_tensor().set_names({INPUT_NAME})
    index = ops.add(ops.convert(image, "i32"), ops.constant(np.array([0, 256, 512], np.int32).reshape(1, 3, 1, 1)))
    normalised = ops.gather(ops.constant(table), index, ops.constant(np.int32(0)))
    for target in list(inner.output(0).get_target_inputs()):
        target.replace_source_output(normalised.output(0))
    score_out, map_out = model.get_results()
    score = score_out.input_value(0)  # what feeds the Result (a Result's own output is no tensor to compute on)
    c = calibration
    # normalized_score and the decision by the head's own functions, the float graph's too: the
    # first on graph nodes (_Node), the second a float32 threshold at this sensitivity.
    normalized = normalized_score(_Node(score, ops), c.image_threshold, c.score_min, c.score_max).output
    anomalous = ops.greater_equal(score, ops.constant(np.float32(c.decision_threshold(sensitivity))))
    normalized_name, anomalous_name = OUTPUT_NAMES[1:3]
    normalized.output(0).get_tensor().set_names({normalized_name})
    anomalous.output(0).get_tensor().set_names({anomalous_name})
    # The graph's own Result nodes for score and map (new ones beside them would leave the old
    # ones dangling, which the IR writer refuses), new ones between them: the float32 graph's order.
    outputs = [score_out, ops.result(normalized), ops.result(anomalous), map_out]
    return ov.Model(outputs, [image], "ckaad_int8")


class _Node:
    """An OpenVINO graph node with the arithmetic :func:`ckaad_fast.head.normalized_score` uses
    (``-``, ``/``, ``+`` by a Python number, ``clip``), each in float32 as the float graph's
    tensors compute it: so the int8 graph's normalised score is the head's formula, not a copy."""

    def __init__(self, output, ops):
        self.output, self._ops = output, ops

    def _op(self, fn, value):
        return _Node(fn(self.output, self._ops.constant(np.float32(value))), self._ops)

    def __sub__(self, value):
        return self._op(self._ops.subtract, value)

    def __truediv__(self, value):
        return self._op(self._ops.divide, value)

    def __add__(self, value):
        return self._op(self._ops.add, value)

    def clip(self, lo, hi):
        return _Node(self._ops.clamp(self.output, float(lo), float(hi)), self._ops)
