"""Scoring with an exported model, without PyTorch: what an inspection PC or an inference box runs.

:class:`Deployment` opens a folder written by ``ckaad-fast export`` (the graph and its sidecar
``model.json``) and scores image files with ONNX Runtime or OpenVINO, numpy and Pillow: the same
decoding and resizing as the Scorer (:mod:`ckaad_fast.pixels`), the graph's own normalisation,
scores, normalised scores and decisions, and the defect regions at the calibration's pixel
threshold (:mod:`ckaad_fast.regions`). Nothing here imports torch, so a process starts in a
fraction of the time ``import torch`` takes (3-4 s on a 2-core CPU).

What it does not do yet: tiled exports (the graph scores tiles; score those with the checkpoint),
and 16-bit or float images (the graph takes 8-bit RGB; such files get an error result naming
why). Both are refused by name, never scored differently from the Scorer.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .decisions import DEFAULT_SENSITIVITY, check_sensitivity, decision_threshold
from .pixels import ImageRejected, decode_pixels
from .regions import Region, find_regions
from .runtimes import compile_openvino, onnxruntime_session

__all__ = ["Deployment", "DeployResult", "SIDECAR", "RUNTIMES"]

#: The sidecar ``ckaad-fast export`` writes beside the graph.
SIDECAR = "model.json"
#: The runtimes that run an exported graph here, and the graph formats each reads.
RUNTIMES = {"onnxruntime": ("onnx",), "openvino": ("openvino", "onnx")}


@dataclass
class DeployResult:
    """One file's result: ``score`` (None where it could not be scored, with ``error`` saying
    why), ``normalized_score`` and ``is_anomalous`` (None without a calibration), the raw
    ``map`` (H, W) float32 at the model's input size (when asked for), and ``regions`` (None
    without a pixel threshold)."""

    path: str
    score: float | None
    normalized_score: float | None = None
    is_anomalous: bool | None = None
    map: np.ndarray | None = None
    regions: list[Region] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Deployment:
    """An exported model in ``folder`` run by ``runtime`` (None: the graph format's own, ONNX
    Runtime for ONNX and OpenVINO for OpenVINO IR) with ``threads`` threads (None: the runtime's
    choice), deciding at ``sensitivity`` (None: the export's)."""

    def __init__(self, folder, runtime: str | None = None, threads: int | None = None,
                 sensitivity: float | None = None):
        self.folder = Path(folder)
        sidecar = self.folder / SIDECAR
        try:
            self.sidecar = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{str(sidecar)!r} cannot be read ({e}): give a folder written by ckaad-fast export") from None
        fmt = self.sidecar.get("format")
        if fmt == "pt2":
            raise ValueError(f"{str(self.folder)!r} holds an AOTInductor package, which needs PyTorch: export with "
                             "--format onnx or openvino for a deployment without it")
        if self.sidecar.get("tiling"):
            raise ValueError(f"{str(self.folder)!r} holds a tiled model, whose graph scores tiles: score full-size "
                             "images with the checkpoint (ckaad-fast score --checkpoint CKPT)")
        self.runtime = runtime or ("onnxruntime" if fmt == "onnx" else "openvino")
        if self.runtime not in RUNTIMES or fmt not in RUNTIMES[self.runtime]:
            raise ValueError(f"runtime must be one of {sorted(RUNTIMES)} for a {fmt} graph, got {self.runtime!r}")
        self.image_size = tuple(int(v) for v in self.sidecar["image_size"])
        self.calibration = self.sidecar.get("calibration")
        self.sensitivity = check_sensitivity(self.sidecar.get("sensitivity", DEFAULT_SENSITIVITY)
                                             if sensitivity is None else sensitivity)
        self._run = _runtime(self.runtime, self.folder / self.sidecar["file"], self.sidecar["input"]["name"], threads)

    def threshold(self) -> float | None:
        """The raw score at or above which an image is anomalous here (None: uncalibrated)."""
        c = self.calibration
        if c is None:
            return None
        return decision_threshold(c["image_threshold"], c["score_min"], c["score_max"], self.sensitivity)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs (``score``, ``normalized_score``, ``is_anomalous``,
        ``anomaly_map``) for (B, 3, H, W) uint8 RGB images at the model's input size."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images must be (B, 3, {self.image_size[0]}, {self.image_size[1]}) uint8, "
                             f"got {images.shape}")
        return dict(zip(self.sidecar["outputs"], self._run(images)))

    def score_paths(self, paths: Iterable, batch_size: int = 16, return_maps: bool = False,
                    regions: bool | None = None) -> Iterator[DeployResult]:
        """One :class:`DeployResult` per file, in the order given; a file that cannot be read or
        scored gives a result with ``error`` set, and the others are still scored. ``regions``
        (None: where the calibration has a pixel threshold) adds each image's defect regions."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        pixel = (self.calibration or {}).get("pixel_threshold")
        if regions and pixel is None:
            raise ValueError("regions need an export of a checkpoint calibrated with a pixel threshold")
        regions = pixel is not None if regions is None else bool(regions)
        for start in range(0, len(paths), batch_size):
            yield from self._batch(paths[start:start + batch_size], return_maps, pixel if regions else None)

    def _batch(self, paths: list[str], return_maps: bool, pixel) -> Iterator[DeployResult]:
        images, results = [], {}
        for i, path in enumerate(paths):
            try:
                arr = decode_pixels(path, self.image_size)
            except (OSError, ValueError, ImageRejected) as e:
                results[i] = DeployResult(path, None, error=f"cannot read the image: {e}")
                continue
            if arr.dtype != np.uint8:
                results[i] = DeployResult(path, None, error="a 16-bit or float image: the exported graph takes 8-bit "
                                                            "RGB; score it with the checkpoint")
                continue
            images.append((i, arr))
        if images:
            out = self(np.stack([a for _, a in images]))
            threshold = self.threshold()
            for j, (i, _) in enumerate(images):
                results[i] = self._result(paths[i], out, j, threshold, return_maps, pixel)
        for i in range(len(paths)):
            yield results[i]

    def _result(self, path, out, j, threshold, return_maps, pixel) -> DeployResult:
        score = float(np.asarray(out["score"])[j])
        if not math.isfinite(score):
            return DeployResult(path, None, error=f"non-finite score ({score}): the image or the model produced NaN "
                                                  "or infinite values")
        amap = np.asarray(out["anomaly_map"][j], dtype=np.float32)
        calibrated = self.calibration is not None
        return DeployResult(
            path, score,
            normalized_score=float(out["normalized_score"][j]) if calibrated else None,
            # The float32 score against the float32 threshold, as every path decides.
            is_anomalous=bool(score >= threshold) if calibrated else None,
            map=amap if return_maps else None,
            regions=find_regions(amap, pixel) if pixel is not None else None,
        )


def _runtime(name: str, graph: Path, input_name: str, threads: int | None):
    """``run(images) -> outputs`` (in the graph's order) of the graph file in the runtime ``name``."""
    if not graph.is_file():
        raise ValueError(f"{str(graph)!r} is missing: the export folder is incomplete")
    if name == "onnxruntime":
        session = onnxruntime_session(graph, threads)
        return lambda images: session.run(None, {input_name: images})
    compiled = compile_openvino(graph, "f32", threads)
    request = compiled.create_infer_request()

    def run(images):
        result = request.infer({0: images})
        return [np.asarray(result[o]) for o in compiled.outputs]

    return run
