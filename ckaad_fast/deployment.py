"""Scoring with an exported model, without PyTorch: what an inspection PC or an inference box runs.

:class:`Deployment` opens a folder written by ``ckaad-fast export`` (the graph and its sidecar
``model.json``) and scores image files with ONNX Runtime or OpenVINO, numpy and Pillow: the same
decoding and resizing as the Scorer (:mod:`ckaad_fast.pixels`), the graph's own normalisation,
scores, normalised scores and decisions, and the defect regions at the calibration's pixel
threshold (:mod:`ckaad_fast.regions`). Nothing here imports torch, so a process starts in a
fraction of the time ``import torch`` takes (3-4 s on a 2-core CPU).

A tiled model's graph scores tiles: the client cuts each full-resolution image into the recorded
grid, runs the tiles, stitches their maps by the blend weights of :mod:`ckaad_fast.tiling` and
takes the image score (the mean of the top-k of the stitched map) and the decision from the
stitched map, as the Scorer does. Refused by name, never scored differently from the Scorer:
tiles whose size differs from the model's input (the Scorer resizes them in floating point, and
the graph takes 8-bit pixels), 16-bit or float images (an error result naming why), and AOTInductor
packages (they need PyTorch).

``ckaad-fast score --checkpoint EXPORT_DIR`` runs this through the results folder of ``score``
(:class:`ckaad_fast.scoring.deployed.DeployedScorer`).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import ArgumentError, error_text
from .decisions import DEFAULT_SENSITIVITY, check_sensitivity, decision_threshold, normalized_score
from .pixels import ImageRejected, decode_pixels
from .regions import Region, find_regions
from .runtimes import compile_openvino, onnxruntime_session
from .tiling import Tiling, axis_weights

__all__ = ["Deployment", "DeployResult", "SIDECAR", "RUNTIMES"]

#: The sidecar ``ckaad-fast export`` writes beside the graph.
SIDECAR = "model.json"
#: The runtimes that run an exported graph here, and the graph formats each reads.
RUNTIMES = {"onnxruntime": ("onnx",), "openvino": ("openvino", "onnx")}


@dataclass
class DeployResult:
    """One file's result: ``score`` (None where it could not be scored, with ``error`` saying
    why), ``normalized_score`` and ``is_anomalous`` (None without a calibration), the raw
    ``map`` (H, W) float32 at the model's input size, or at the file's own size for a tiled
    model (when asked for), ``regions`` (None without a pixel threshold), and ``image`` the
    (H, W, 3) uint8 image the model saw (when asked for)."""

    path: str
    score: float | None
    normalized_score: float | None = None
    is_anomalous: bool | None = None
    map: np.ndarray | None = None
    regions: list[Region] | None = None
    error: str | None = None
    image: np.ndarray | None = None

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
        self.image_size = tuple(int(v) for v in self.sidecar["image_size"])
        #: The model's tiling (None: each image is resized whole to ``image_size``).
        self.tiling, self.topk = _tiling(self.sidecar, self.image_size, self.folder)
        self.runtime = runtime or ("onnxruntime" if fmt == "onnx" else "openvino")
        if self.runtime not in RUNTIMES or fmt not in RUNTIMES[self.runtime]:
            raise ArgumentError("runtime", f"must be one of {[r for r in RUNTIMES if fmt in RUNTIMES[r]]} for {fmt} "
                                           f"graphs, got {self.runtime!r}")
        self.calibration = self.sidecar.get("calibration")
        self.sensitivity = check_sensitivity(self.sidecar.get("sensitivity", DEFAULT_SENSITIVITY)
                                             if sensitivity is None else sensitivity)
        self._run = _runtime(self.runtime, self.folder / self.sidecar["file"], self.sidecar["input"]["name"], threads)
        batch = self.sidecar["input"].get("batch")
        #: The graph's fixed batch (None: dynamic); a shorter batch is padded, its padding dropped.
        self.fixed_batch = batch if isinstance(batch, int) else None

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
        n, fixed = len(images), self.fixed_batch
        if fixed is None:
            return dict(zip(self.sidecar["outputs"], self._run(images)))
        outs: dict[str, list] = {}
        for start in range(0, n, fixed):  # whole batches; the last one padded with its last image
            part = images[start:start + fixed]
            part = np.concatenate([part, np.repeat(part[-1:], fixed - len(part), axis=0)])
            for name, value in zip(self.sidecar["outputs"], self._run(part)):
                outs.setdefault(name, []).append(np.asarray(value)[:min(fixed, n - start)])
        return {name: np.concatenate(v) for name, v in outs.items()}

    def score_paths(self, paths: Iterable, batch_size: int = 16, return_maps: bool = False,
                    regions: bool | None = None, return_images: bool = False,
                    on_batch=None) -> Iterator[DeployResult]:
        """One :class:`DeployResult` per file, in the order given; a file that cannot be read or
        scored gives a result with ``error`` set, and the others are still scored. ``regions``
        (None: where the calibration has a pixel threshold) adds each image's defect regions.
        ``batch_size`` images (a tiled model: tiles of one image) go through the graph at a time;
        ``on_batch`` is called after each batch of files."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        pixel = (self.calibration or {}).get("pixel_threshold")
        if regions and pixel is None:
            raise ValueError("regions need an export of a checkpoint calibrated with a pixel threshold")
        regions = pixel is not None if regions is None else bool(regions)
        want = _Wanted(return_maps, return_images, pixel if regions else None, self.threshold())
        files = 1 if self.tiling is not None else batch_size  # a tiled image is a batch of tiles
        chunks = [paths[start:start + files] for start in range(0, len(paths), files)]
        # The next batch is decoded on a thread while the runtime scores this one (both release
        # the GIL): decoding leaves the critical path, as the Scorer's DataLoader workers do.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self._decode, chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                decoded = ahead.result()
                ahead = pool.submit(self._decode, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield from self._batch(chunk, decoded, want, batch_size)
                if on_batch is not None:
                    on_batch()

    def _decode(self, paths: list[str]) -> tuple[list, dict]:
        """([(index, (3, H, W) uint8 image)], {index: error result}) of a batch of files."""
        images, errors = [], {}
        for i, path in enumerate(paths):
            try:
                arr = decode_pixels(path, None if self.tiling is not None else self.image_size)
                if arr.dtype != np.uint8:
                    raise ImageRejected("a 16-bit or float image: the exported graph takes 8-bit RGB; score it "
                                        "with the checkpoint")
                if self.tiling is not None and not self.tiling.fits(*arr.shape[1:]):
                    raise ImageRejected(self.tiling.too_small(*arr.shape[1:]))
            except (OSError, ValueError, ImageRejected) as e:
                errors[i] = DeployResult(path, None, error=error_text(e))  # the Scorer's words
                continue
            images.append((i, arr))
        return images, errors

    def _batch(self, paths: list[str], decoded, want: "_Wanted", batch_size: int) -> Iterator[DeployResult]:
        images, results = decoded
        if self.tiling is not None:
            for i, arr in images:
                amap = self._stitched(arr, batch_size)
                results[i] = self._result(paths[i], _top_mean(amap, self.topk), amap, arr, want)
        elif images:
            out = self(np.stack([a for _, a in images]))
            for j, (i, arr) in enumerate(images):
                results[i] = self._result(paths[i], float(np.asarray(out["score"])[j]),
                                          np.asarray(out["anomaly_map"][j], dtype=np.float32), arr, want)
        for i in range(len(paths)):
            yield results[i]

    def _stitched(self, image: np.ndarray, batch_size: int) -> np.ndarray:
        """The (H, W) float32 map of a full-resolution (3, H, W) image, stitched from its tiles'
        maps by :func:`ckaad_fast.tiling.axis_weights` (what the Scorer's Stitcher adds)."""
        h, w = image.shape[1:]
        s, stride = self.tiling.size, self.tiling.stride
        ys, wy = axis_weights(h, s, stride)
        xs, wx = axis_weights(w, s, stride)
        row, col = dict(zip(ys, wy)), dict(zip(xs, wx))
        canvas = np.zeros((h, w), dtype=np.float32)
        corners = self.tiling.grid(h, w)
        for start in range(0, len(corners), batch_size):
            part = corners[start:start + batch_size]
            maps = self(np.stack([image[:, y:y + s, x:x + s] for y, x in part]))["anomaly_map"]
            for m, (y, x) in zip(np.asarray(maps, dtype=np.float32), part):
                canvas[y:y + s, x:x + s] += (row[y][:, None] * col[x][None, :]) * m
        return canvas

    def _result(self, path, score: float, amap: np.ndarray, image: np.ndarray, want: "_Wanted") -> DeployResult:
        if not math.isfinite(score):
            return DeployResult(path, None, error=f"non-finite score ({score}): the image or the model produced NaN "
                                                  "or infinite values")
        c = self.calibration
        return DeployResult(
            path, score,
            normalized_score=(float(normalized_score(np.float32(score), c["image_threshold"], c["score_min"],
                                                     c["score_max"])) if c is not None else None),
            # The float32 score against the float32 threshold, as every path decides.
            is_anomalous=bool(score >= want.threshold) if c is not None else None,
            map=amap if want.maps else None,
            regions=find_regions(amap, want.pixel) if want.pixel is not None else None,
            image=np.ascontiguousarray(image.transpose(1, 2, 0)) if want.images else None,
        )


@dataclass(frozen=True)
class _Wanted:
    """What a call of :meth:`Deployment.score_paths` asked for, and its decision threshold."""

    maps: bool
    images: bool
    pixel: float | None
    threshold: float | None


def _tiling(sidecar: dict, image_size: tuple[int, int], folder: Path) -> tuple[Tiling | None, int | None]:
    """(tiling, top-k of the stitched map) of an export (None, None: not tiled)."""
    record = sidecar.get("tiling")
    if not record:
        return None, None
    tiling = Tiling(int(record["size"]), int(record["stride"]))
    if (tiling.size, tiling.size) != tuple(image_size):
        raise ValueError(f"{str(folder)!r} holds a model whose {tiling.size} px tiles are resized to its "
                         f"{image_size[0]} px input in floating point, before the graph's 8-bit input: score it "
                         "with the checkpoint (ckaad-fast score --checkpoint CKPT)")
    topk = record.get("image_score", {}).get("topk")
    return tiling, (int(topk) if topk is not None else None)


def _top_mean(amap: np.ndarray, topk: int | None) -> float:
    """The image score of a stitched map: the mean of its ``topk`` largest values (None: of all),
    in float64, as a float32 number (the ops' rule)."""
    flat = amap.reshape(-1)
    k = flat.size if topk is None else min(int(topk), flat.size)
    top = np.partition(flat, flat.size - k)[flat.size - k:] if k < flat.size else flat
    return float(np.float32(top.astype(np.float64).mean()))


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
