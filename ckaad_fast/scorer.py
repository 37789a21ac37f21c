"""Score images with a trained detector, as fast as the hardware allows.

:class:`Scorer` wraps a :class:`~ckaad_fast.model.CKAAD` for inference:

- ``scorer(images)`` scores a batch of normalised images (B, 3, H, W) and returns
  ``(scores (B,), maps (B, H, W))`` in float32 on the scorer's device;
- ``scorer.score_paths(paths)`` and ``scorer.score_folder(folder)`` stream files through a
  DataLoader (decoding on worker processes, pinned memory, non-blocking copies, one batch in
  flight while the previous one is read back) and yield one :class:`ScoreResult` per file, in
  input order. A file that cannot be read gives a result with ``error`` set and no score; the
  stream goes on.

The whole forward (backbone, auto-encoder, fused anomaly map, top-k score) runs under
``torch.inference_mode``. On a GPU it runs in channels_last with bf16 (default) or fp16 autocast;
the anomaly map and the score are always computed from the features in float32. ``compile=True``
builds the forward with ``torch.compile(fullgraph=True, dynamic=False)``; ``cuda_graphs=True``
captures it into one CUDA graph per batch shape (after a warm-up on a side stream) and replays it
from a static input buffer. When shapes are static (compile or CUDA graphs), a short batch (the
last one of a stream, or one with unreadable files left out) is padded to ``batch_size`` by
repeating its last image, and the padding's results are dropped before anything is returned.

On the CPU the same API runs the CPU paths of the ops in float32.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_open, atomic_write_text
from . import ops
from .data import _size_hw, _to_rgb_float01, list_images
from .model import CKAAD, load_checkpoint, model_from_checkpoint
from .profiling import enable_nvtx, nvtx_enabled, nvtx_range

__all__ = ["Scorer", "ScoreResult", "ScoreSummary", "decode_image", "resolve_dtype", "score_to_folder", "read_scores_csv",
           "part_name"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class ScoreResult:
    """The result for one file of :meth:`Scorer.score_paths`.

    ``score`` is the image score (None when the file could not be read), ``map`` the anomaly
    map (H, W) float32 at the model's input size (None when maps were not asked for or the file
    could not be read), ``error`` a one-line description of why the file could not be scored
    (None when it was), ``image`` the (H, W, 3) uint8 image the model saw (only with
    ``return_images=True``).
    """

    path: str
    score: float | None
    map: np.ndarray | None = None
    error: str | None = None
    image: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The compute dtype: ``None``/"auto" is bfloat16 on CUDA and float32 on the CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
        dtype = _DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if device.type != "cuda" and dtype != torch.float32:
        raise ValueError(
            f"dtype {str(dtype).removeprefix('torch.')} needs a CUDA device (autocast runs on the GPU only); "
            "on the CPU the scorer runs in float32"
        )
    return dtype


def _resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    return device


# ------------------------------------------------------------------------------------------------
# Decoding (runs in the DataLoader's worker processes)
# ------------------------------------------------------------------------------------------------
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def decode_image(path, image_size) -> torch.Tensor:
    """Read ``path`` resized to ``image_size`` as a (3, H, W) tensor, before normalisation.

    8-bit images come back as uint8 (a quarter of the bytes to move between processes and to
    the GPU); 16-bit and float images as float32 in [0, 1]. Either, divided by 255 (uint8) and
    normalised, equals :func:`ckaad_fast.data.load_image` exactly: the same PIL conversion and
    bilinear resize, then the same float32 arithmetic.
    """
    h, w = _size_hw(image_size)
    with Image.open(path) as im:
        if im.mode in _HIGH_DEPTH_MODES:
            arr = _to_rgb_float01(im, (w, h))
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        rgb = im.convert("RGB")
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.BILINEAR)
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _error_text(e: BaseException) -> str:
    msg = " ".join(str(e).split())  # one line
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _DecodeDataset(Dataset):
    """Items ``(index, image or None, error or None)``: a file that cannot be decoded gives an
    error marker instead of an exception, so one bad file never stops the stream."""

    def __init__(self, paths: Sequence[str], image_size, nvtx_on: bool):
        self.paths = list(paths)
        self.image_size = image_size
        self.nvtx_on = nvtx_on

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with nvtx_range("decode"):
            try:
                return i, decode_image(self.paths[i], self.image_size), None
            except Exception as e:  # noqa: BLE001 - any failure to read is reported, not raised
                return i, None, _error_text(e)


def _worker_init(worker_id: int) -> None:
    # Decoding is single-threaded work; torch's intra-op threads would only oversubscribe cores.
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        enable_nvtx(info.dataset.nvtx_on)


def _collate(items):
    """(indices of the decoded items, their images stacked, [(index, error)] of the others)."""
    good = [(i, x) for i, x, err in items if err is None]
    errors = [(i, err) for i, x, err in items if err is not None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    if not good:
        return idx, None, errors
    imgs = [x for _, x in good]
    if any(x.dtype != torch.uint8 for x in imgs):
        # A 16-bit image in the batch: convert the 8-bit ones exactly as load_image does.
        imgs = [x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x for x in imgs]
    return idx, torch.stack(imgs), errors


@contextlib.contextmanager
def _stage(name: str):
    """An NVTX range (when on) and a torch.profiler label (when profiling) around a stage that
    runs outside the compiled forward."""
    with nvtx_range(name):
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function(f"ckaad_fast/{name}"):
                yield
        else:
            yield


# ------------------------------------------------------------------------------------------------
# The scorer
# ------------------------------------------------------------------------------------------------
class Scorer:
    """Fast inference with a trained :class:`~ckaad_fast.model.CKAAD`.

    Args:
        model: the detector (moved to ``device`` and put in eval mode; not copied).
        device: "cpu" or "cuda[:N]".
        dtype: compute dtype of the backbone and the auto-encoder: None/"auto" (bfloat16 on CUDA,
            float32 on the CPU), "float32", "bfloat16" or "float16" (the last two on CUDA only,
            through autocast). Maps and scores are float32 whatever the dtype.
        compile: build the forward with ``torch.compile(fullgraph=True, dynamic=False)``.
        cuda_graphs: capture the forward into a CUDA graph per batch shape (CUDA only).
        batch_size: images per batch for :meth:`score_paths`.
        num_workers: decoding processes for :meth:`score_paths`; None picks a number from the
            CPU count (shared by the processes torchrun starts on the machine; 0 decodes in this
            process).
        topk: the image score is the mean of the ``topk`` largest map values; None takes the
            model's (``model.config.topk``); "mean" is the mean of the whole map.
        pad_batches: pad short batches to ``batch_size`` (repeating the last image; the padding's
            results are dropped). None: on when compile or cuda_graphs is on, so that one
            compiled graph / one CUDA graph serves every batch of a stream.
        warmup: forward passes run before a CUDA graph is captured (compilation, autotuning and
            cuDNN's algorithm search happen there, not in the capture).
    """

    def __init__(
        self,
        model: CKAAD,
        device="cpu",
        dtype=None,
        compile: bool = False,
        cuda_graphs: bool = False,
        batch_size: int = 16,
        num_workers: int | None = None,
        topk: int | str | None = None,
        pad_batches: bool | None = None,
        warmup: int = 3,
    ):
        if not isinstance(model, CKAAD):
            raise TypeError(f"model must be a ckaad_fast.model.CKAAD, got {type(model).__name__}")
        self.device = _resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device; on the CPU leave it off")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"num_workers must be an int >= 0 or None, got {num_workers!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.config = model.config
        self.image_size = tuple(self.config.image_size)
        self.topk = self._resolve_topk(topk)
        self.compile = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pad_batches = (self.compile or self.cuda_graphs) if pad_batches is None else bool(pad_batches)
        self.warmup = warmup

        self._channels_last = self.device.type == "cuda"
        model = model.eval().to(self.device)
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean = torch.tensor(self.config.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.config.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._fn: Callable = self._forward_eager
        if self.compile:
            self._fn = torch.compile(self._forward_eager, fullgraph=True, dynamic=False)
        self._graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_pool = None

    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, device="cpu", **kwargs) -> "Scorer":
        """A scorer for the detector saved at ``path`` (loaded with ``weights_only=True``; a file
        that is not a ckaad_fast checkpoint raises a ValueError that says so)."""
        model = model_from_checkpoint(load_checkpoint(path, map_location="cpu"), map_location="cpu")
        return cls(model, device=device, **kwargs)

    def _resolve_topk(self, topk):
        if topk is None:
            topk = self.config.topk
        elif isinstance(topk, str):
            if topk != "mean":
                raise ValueError(f"topk must be a positive int, None (the model's) or 'mean', got {topk!r}")
            topk = None
        n = self.image_size[0] * self.image_size[1]
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n):
            raise ValueError(f"topk must be an int in [1, H*W = {n}], None (the model's) or 'mean', got {topk!r}")
        return topk

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Scorer(backbone={c.backbone!r}, layers={c.layers}, image_size={self.image_size}, "
            f"device={str(self.device)!r}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"compile={self.compile}, cuda_graphs={self.cuda_graphs}, batch_size={self.batch_size}, "
            f"topk={self.topk})"
        )

    # -------------------------------------------------------------------------------------------
    # The forward
    # -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            # cache_enabled=False: cached casts would be captured into a graph and go stale.
            return torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)
        return contextlib.nullcontext()

    def _forward_eager(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone and auto-encoder in the compute dtype, then the fused map and score in float32."""
        m = self.model
        cfg = self.config
        with self._autocast():
            feats = m.features(x)
            recon = m.reconstruct(feats)
        # Under autocast a layer's output dtype depends on its last op; the fused ops take pairs
        # of one dtype (and accumulate in float32 whatever it is).
        recon = [r if r.dtype == f.dtype else r.to(f.dtype) for f, r in zip(feats, recon)]
        with torch.autocast(self.device.type, enabled=False):
            maps = ops.anomaly_map(feats, recon, out_size=tuple(x.shape[-2:]), sigma=cfg.sigma, border=cfg.border)
            scores = ops.image_score(maps, self.topk)
        return scores, maps

    def _capture(self, x: torch.Tensor):
        """Warm up on a side stream, then capture one CUDA graph for ``x``'s shape."""
        dev = self.device
        static_in = torch.empty_like(x).copy_(x)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._fn(static_in)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            static_out = self._fn(static_in)
        if self._graph_pool is None:
            # Graphs of other batch shapes share the memory pool: they are replayed one at a time.
            self._graph_pool = graph.pool()
        entry = (static_in, graph, static_out)
        self._graphs[(tuple(x.shape), tuple(x.stride()), x.dtype)] = entry
        return entry

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward on a prepared device batch. With CUDA graphs the outputs are the graph's
        static buffers, overwritten by the next replay: copy them before the next call."""
        with _stage("forward"):
            if not self.cuda_graphs:
                return self._fn(x)
            key = (tuple(x.shape), tuple(x.stride()), x.dtype)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(x)
            static_in, graph, static_out = entry
            static_in.copy_(x)
            graph.replay()
            return static_out

    def _prepare(self, images: torch.Tensor, normalise: bool) -> torch.Tensor:
        """Device, float32, normalised (when the images are raw: uint8 or [0, 1] floats), channels_last on CUDA."""
        with _stage("copy"):
            x = images.to(self.device, non_blocking=True)
        if normalise:
            if x.dtype == torch.uint8:
                x = x.to(torch.float32) / 255.0
            x = (x - self._mean) / self._std
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self.pad_batches or n >= self.batch_size:
            return x
        pad = x[-1:].expand(self.batch_size - n, *x.shape[1:])
        out = torch.cat([x, pad], 0)
        return out.contiguous(memory_format=torch.channels_last) if self._channels_last else out

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score normalised images (B, 3, H, W) (normalised as the model expects: ``config.mean``
        and ``config.std``). Returns ``(scores (B,), maps (B, H, W))``, float32, on the scorer's
        device; equal to ``model(images)`` for the same top-k (in float32)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must have shape (B >= 1, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be normalised floating-point tensors, got {images.dtype} "
                "(score_paths decodes and normalises files for you)"
            )
        x = self._prepare(images, normalise=False)
        scores, maps = self._run(x)
        if self.cuda_graphs:
            scores, maps = scores.clone(), maps.clone()
        return scores, maps

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise raw images (uint8 in [0, 255], or floats in [0, 1]) as the model expects."""
        x = images.to(self._mean.device)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 255.0
        return (x - self._mean) / self._std

    # -------------------------------------------------------------------------------------------
    # Streaming
    # -------------------------------------------------------------------------------------------
    def _workers(self, n_paths: int) -> int:
        if self.num_workers is not None:
            return self.num_workers
        if n_paths <= self.batch_size:
            return 0  # starting processes costs more than decoding one batch
        cpus = os.cpu_count() or 1
        try:
            # Under torchrun the machine's cores are shared by its LOCAL_WORLD_SIZE processes.
            cpus = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        except ValueError:
            pass
        if self.device.type == "cuda":
            return max(1, min(8, cpus - 1))
        # On the CPU the model needs the cores far more than decoding does (a few ms per image
        # against tens of ms): one decoding process per 4 cores, none below 4.
        return min(4, cpus // 4)

    def score_paths(
        self,
        paths: Iterable,
        return_maps: bool = True,
        return_images: bool = False,
        on_batch: Callable[[], None] | None = None,
    ) -> Iterator[ScoreResult]:
        """Score image files; yields one :class:`ScoreResult` per path, in the order given.

        Files are decoded on ``num_workers`` DataLoader worker processes into pinned memory and
        copied to the device without blocking; while one batch runs on a GPU, the previous one
        is read back. A file that cannot be read (missing, corrupt, not an image) gives a
        result with ``error`` set; the others are still scored. ``return_maps=False`` skips
        reading the maps back (faster when only scores are wanted). ``return_images=True`` also
        gives each (H, W, 3) uint8 image the model saw (for overlays). ``on_batch`` is called
        after each batch (e.g. a profiler's ``step``).

        Raises ValueError at once (not on the first ``next``) when ``paths`` is empty.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("no image paths given")
        return self._stream(paths, return_maps, return_images, on_batch)

    def score_folder(self, folder, recursive: bool = True, **kwargs) -> Iterator[ScoreResult]:
        """Score every image file under ``folder`` (sorted; see :func:`ckaad_fast.data.list_images`).
        A missing or empty folder raises ValueError."""
        return self.score_paths(list_images(folder, recursive=recursive), **kwargs)

    def _loader(self, paths: list[str]) -> DataLoader:
        nw = self._workers(len(paths))
        ds = _DecodeDataset(paths, self.image_size, nvtx_enabled())
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=nw,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init if nw > 0 else None,
            prefetch_factor=2 if nw > 0 else None,
        )

    def _launch(self, imgs: torch.Tensor, return_maps: bool):
        """Run one decoded batch; returns host buffers being filled and an event (CUDA) to wait on."""
        n = imgs.shape[0]
        with torch.inference_mode():
            x = self._pad(self._prepare(imgs, normalise=True))
            scores, maps = self._run(x)
            with _stage("readback"):
                if self.device.type == "cuda":
                    # Into pinned memory without blocking: the next batch is launched before
                    # this one is waited for. (With CUDA graphs the copies are queued before the
                    # next replay overwrites the static outputs.)
                    h_scores = torch.empty((n,), dtype=torch.float32, pin_memory=True)
                    h_scores.copy_(scores[:n], non_blocking=True)
                    h_maps = None
                    if return_maps:
                        h_maps = torch.empty((n, *maps.shape[1:]), dtype=torch.float32, pin_memory=True)
                        h_maps.copy_(maps[:n], non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                else:
                    h_scores = scores[:n].clone()
                    h_maps = maps[:n].clone() if return_maps else None
                    done = None
        return h_scores, h_maps, done

    def _stream(self, paths, return_maps, return_images, on_batch) -> Iterator[ScoreResult]:
        # No context manager (inference_mode, autocast) is held across a yield: the caller's
        # code between two results runs in its own mode.
        it = iter(self._loader(paths))
        pending = None
        try:
            for idx, imgs, errors in it:
                launched = None
                if imgs is not None:
                    try:
                        h_scores, h_maps, done = self._launch(imgs, return_maps)
                    except BaseException:
                        # Hand out the finished batch before the error: never lose results.
                        if pending is not None:
                            last, pending = pending, None
                            yield from self._results(paths, *last)
                        raise
                    launched = (idx, h_scores, h_maps, imgs if return_images else None, done)
                if pending is not None:
                    yield from self._results(paths, *pending)
                pending = (launched, errors)
                if on_batch is not None:
                    on_batch()
            if pending is not None:
                last, pending = pending, None
                yield from self._results(paths, *last)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    @staticmethod
    def _results(paths, launched, errors) -> Iterator[ScoreResult]:
        """The results of one batch, in input order (unreadable files were split out); waits
        for the batch's read-back to finish."""
        out: list[tuple[int, ScoreResult]] = [(i, ScoreResult(paths[i], None, None, err)) for i, err in errors]
        if launched is not None:
            idx, h_scores, h_maps, imgs, done = launched
            if done is not None:
                done.synchronize()
            s = h_scores.numpy()
            m = h_maps.numpy() if h_maps is not None else None
            im = None
            if imgs is not None:
                if imgs.dtype != torch.uint8:
                    imgs = (imgs.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
                im = imgs.permute(0, 2, 3, 1).numpy()
            for j, i in enumerate(idx.tolist()):
                out.append((i, ScoreResult(
                    paths[i],
                    float(s[j]),
                    m[j].copy() if m is not None else None,
                    None,
                    im[j].copy() if im is not None else None,
                )))
        out.sort(key=lambda t: t[0])
        return iter([r for _, r in out])


# ------------------------------------------------------------------------------------------------
# Results files: OUT/scores.csv and OUT/maps/
# ------------------------------------------------------------------------------------------------
CSV_NAME = "scores.csv"
MAPS_DIR = "maps"
SCALE_NAME = "colour_scale.json"
MAP_FORMATS = ("none", "npy", "png")
#: Where the ranks of a sharded (torchrun) run put their rows: OUT/parts/scores.rank{r}-of-{n}.csv.
PARTS_DIR = "parts"


def part_name(rank: int, world: int) -> str:
    """The file name of rank ``rank``'s rows in a run of ``world`` processes."""
    return f"scores.rank{rank}-of-{world}.csv"


def _part_files(out: Path) -> list[Path]:
    d = out / PARTS_DIR
    return sorted(d.glob("scores.rank*-of-*.csv")) if d.is_dir() else []


@dataclass
class ScoreSummary:
    """What :func:`score_to_folder` did: counts, time and where the results are."""

    csv_path: Path
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    anomalous: int | None = None
    seconds: float = 0.0
    map_range: tuple[float, float] | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else float("nan")


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=True)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, np.asarray(arr, dtype=np.float32))


def read_scores_csv(path) -> list[dict]:
    """The rows of a scores.csv (dicts of strings; ``score`` is "" for rows with an error).
    A file that is not a scores.csv raises ValueError."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if not {"path", "score", "error"} <= set(fields):
            raise ValueError(f"{str(path)!r} is not a scores.csv (columns {fields}, expected path, score, error)")
        return list(reader)


def _row_done(row: dict) -> bool:
    if row.get("error"):
        return False
    try:
        return math.isfinite(float(row.get("score", "")))
    except ValueError:
        return False


def map_names(paths: Sequence[str], ext: str) -> dict[str, str]:
    """Map file names (relative to OUT/maps) for ``paths``: each image's path relative to the
    deepest folder holding all of them, with its extension replaced by ``ext`` (".npy" or
    ".png"); where two images would share a name (a.png and a.jpg), the original extension is
    kept in front (a.png.npy, a.jpg.npy)."""
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    rel = [os.path.relpath(a, root) for a in absolute]
    stems = [os.path.splitext(r)[0] for r in rel]
    counts: dict[str, int] = {}
    for st in stems:
        counts[st] = counts.get(st, 0) + 1
    return {p: (st if counts[st] == 1 else r) + ext for p, r, st in zip(paths, rel, stems)}


def _previous_rows(out: Path) -> list[dict]:
    """The rows of an earlier run: OUT/scores.csv and the parts an interrupted sharded run left
    in OUT/parts/, one row per path (a scored row wins over a row with an error, a later file
    over an earlier one), in the order first seen."""
    files = ([out / CSV_NAME] if (out / CSV_NAME).exists() else []) + _part_files(out)
    best: dict[str, dict] = {}
    for f in files:
        for r in read_scores_csv(f):
            p = r["path"]
            if p not in best or _row_done(r) or not _row_done(best[p]):
                best[p] = r
    return list(best.values())


def _unlink_parts(out: Path) -> None:
    d = out / PARTS_DIR
    # The parts, and the temporary files of a rank killed while it wrote its part.
    for f in _part_files(out) + (sorted(d.glob(".scores.rank*-of-*.csv.*.tmp")) if d.is_dir() else []):
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / PARTS_DIR).rmdir()


def _finish_row(r: dict, threshold: float | None) -> dict:
    r = {"path": r["path"], "score": r.get("score", ""), "error": r.get("error", "")}
    if threshold is not None:
        try:
            r["is_anomalous"] = str(float(r["score"]) >= threshold) if r["score"] != "" else ""
        except ValueError:
            r["is_anomalous"] = ""
    return r


def _exists_error(csv_path: Path, parts: list[Path]) -> FileExistsError:
    what = repr(str(csv_path)) if csv_path.exists() else \
        f"{str(csv_path.parent / PARTS_DIR)!r} (the partial results of an interrupted run)"
    return FileExistsError(
        f"{what} already exists: pass --resume to score only what is missing, "
        "or --overwrite to score everything again"
    )


def _csv_text(rows: Sequence[dict], with_threshold: bool) -> str:
    cols = ["path", "score", "error"] + (["is_anomalous"] if with_threshold else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def score_to_folder(
    scorer: Scorer,
    paths: Sequence,
    out_dir,
    maps: str = "none",
    threshold: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    map_range: tuple[float, float] | None = None,
    progress: bool = True,
    flush_seconds: float = 2.0,
    on_batch: Callable[[], None] | None = None,
    distributed: bool | None = None,
) -> ScoreSummary:
    """Score ``paths`` and write ``out_dir/scores.csv`` (and the maps), the job of ``ckaad-fast score``.

    scores.csv has one row per image, in input order, with the columns ``path``, ``score``,
    ``error`` (empty when the image was scored) and, with ``threshold``, ``is_anomalous``
    (True when score >= threshold). It is rewritten atomically (temporary file, fsync, rename)
    every ``flush_seconds`` and at the end, also on an interruption or an error, so that it is
    never half-written and holds every result computed before the stop.

    ``maps``: "none", "npy" (the float32 map, ``out_dir/maps/<name>.npy``) or "png" (a heat-map
    overlay on the image the model saw, ``out_dir/maps/<name>.png``; Turbo colours, one range for
    every image: ``map_range``, else the one of an earlier run in ``maps/colour_scale.json``,
    else the minimum and maximum of the first batch's maps; the range used is saved in
    ``maps/colour_scale.json``). See :func:`map_names` for ``<name>``. Map files are written
    atomically too, before the row that reports them.

    ``resume``: keep the rows of an existing scores.csv that were scored (and whose map file
    exists when maps are asked for) and score the rest; rows with an error are retried. Rows an
    interrupted sharded run left in ``out_dir/parts/`` count too (they are folded into scores.csv
    and the part files removed). Without ``resume`` an existing scores.csv (or parts) raises
    FileExistsError unless ``overwrite`` (which removes stale parts).

    ``distributed`` (None: when a process group of more than one process runs, e.g. under
    torchrun; call it on every rank with the same arguments): the images still to score are
    split into contiguous shards of whole batches, one per rank (so that every batch is one a
    single process runs, and the results are the same bit for bit); each rank writes its rows to
    ``out_dir/parts/scores.rank{r}-of-{n}.csv`` (atomically, as above) and its maps straight into
    ``out_dir/maps/``; then rank 0 merges the parts into ``out_dir/scores.csv`` in input order
    (the same file a single process writes) and removes them. When a rank dies, the rows its
    part holds and those of the other ranks' finished parts are kept by ``resume``, with any
    number of processes. Rank 0 fixes the PNG colour range (from the first batch, as a single
    process does) before the others start. Every rank returns the summary of the whole run.
    ``out_dir`` must be one folder seen by every rank (a shared file system across machines).
    """
    _check_arguments(maps, threshold, map_range)
    if map_range is not None:
        map_range = tuple(float(v) for v in map_range)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no images to score")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    from . import distributed as ddp

    if distributed is None:
        distributed = ddp.is_distributed()
    if distributed and ddp.is_distributed():
        return _score_sharded(scorer, paths, out, maps, threshold, resume, overwrite, map_range, progress,
                              flush_seconds, on_batch)
    return _score_local(scorer, paths, out, maps, threshold, resume, overwrite, map_range, progress,
                        flush_seconds, on_batch)


def _check_arguments(maps, threshold, map_range) -> None:
    if maps not in MAP_FORMATS:
        raise ValueError(f"maps must be one of {MAP_FORMATS}, got {maps!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if map_range is not None:
        lo, hi = (float(v) for v in map_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"map_range must be two finite numbers LO < HI, got {map_range!r}")


def _score_local(
    scorer: Scorer,
    paths: list[str],
    out: Path,
    maps: str,
    threshold: float | None,
    resume: bool,
    overwrite: bool,
    map_range: tuple[float, float] | None,
    progress: bool,
    flush_seconds: float,
    on_batch: Callable[[], None] | None,
    part: tuple[int, int] | None = None,
    all_paths: list[str] | None = None,
) -> ScoreSummary:
    """The work of :func:`score_to_folder` in one process. ``part=(rank, world)``: score
    ``paths`` (this rank's share of what is left to do) into OUT/parts/<part_name>, naming the
    maps after ``all_paths`` (the whole input); resume and overwrite are the caller's job then."""
    from .report import overlay, save_png

    old_rows: list[dict] = []
    parts: list[Path] = []
    if part is not None:
        csv_path = out / PARTS_DIR / part_name(*part)
    else:
        csv_path = out / CSV_NAME
        parts = _part_files(out)
        if csv_path.exists() or parts:
            if resume:
                old_rows = _previous_rows(out)
            elif not overwrite:
                raise _exists_error(csv_path, parts)
            else:
                _unlink_parts(out)  # stale rows of an earlier run must not come back on a resume
                parts = []
    out.mkdir(parents=True, exist_ok=True)
    maps_dir = out / MAPS_DIR
    names = map_names(all_paths if all_paths is not None else paths, "." + maps) if maps != "none" else {}

    scale_path = maps_dir / SCALE_NAME
    if maps == "png" and map_range is None and resume and scale_path.is_file():
        try:
            saved = json.loads(scale_path.read_text())
            map_range = (float(saved["lo"]), float(saved["hi"]))
        except (OSError, ValueError, KeyError, TypeError):
            map_range = None

    old = {r["path"]: r for r in old_rows}
    done = {
        p for p in paths
        if p in old and _row_done(old[p]) and (maps == "none" or (maps_dir / names[p]).is_file())
    }
    todo = [p for p in paths if p not in done]
    in_input = set(paths)
    extra_old = [r for r in old_rows if r["path"] not in in_input]  # kept: results are never dropped
    new: dict[str, dict] = {}
    summary = ScoreSummary(csv_path=csv_path, skipped=len(done))

    def flush() -> None:
        rows = []
        for p in paths:
            if p in new:
                rows.append(new[p])
            elif p in old:
                rows.append(old[p])
        rows += extra_old
        _atomic_write_text(csv_path, _csv_text([_finish_row(r, threshold) for r in rows], threshold is not None))

    if parts:
        # Fold an interrupted sharded run's parts into scores.csv, then drop them.
        flush()
        _unlink_parts(out)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) if maps != "none" else None
    futures: list[tuple[concurrent.futures.Future, dict]] = []
    held: list[tuple[ScoreResult, dict]] = []  # PNG maps waiting for the colour scale

    def write_map(name: str, r: ScoreResult, rng) -> None:
        target = maps_dir / name
        if maps == "npy":
            _atomic_save_npy(target, r.map)
        else:
            save_png(overlay(r.image, r.map, rng[0], rng[1]), target)

    def submit(r: ScoreResult, row: dict) -> None:
        futures.append((pool.submit(write_map, names[r.path], r, map_range), row))

    def save_scale() -> None:
        _atomic_write_text(scale_path, json.dumps({"colormap": "turbo", "lo": map_range[0], "hi": map_range[1]}) + "\n")

    def fix_scale_and_release() -> None:
        # The colour scale of a run without map_range: the range of its first batch's maps.
        nonlocal map_range
        if map_range is None:
            lo = float(min(r.map.min() for r, _ in held))
            hi = float(max(r.map.max() for r, _ in held))
            map_range = (lo, hi if hi > lo else lo + 1e-6)
            save_scale()
        for r, row in held:
            submit(r, row)
        held.clear()

    def settle(block: bool) -> None:
        # Rows enter the results once their map is on disk; a failed write is reported in the row.
        nonlocal futures
        keep = []
        for fut, row in futures:
            if block or fut.done():
                err = fut.exception()
                if err is not None:
                    row["error"] = f"map not written: {_error_text(err)}"
                    row["score"] = ""
                    summary.scored -= 1
                    summary.failed += 1
                    summary.errors.append((row["path"], row["error"]))
                new[row["path"]] = row
            else:
                keep.append((fut, row))
        futures = keep

    if os.environ.get("CKAAD_FAST_TEST_DIE_AFTER_BATCHES"):
        # Test-only fault injection (see ckaad_fast.distributed): die after a periodic save.
        from .distributed import maybe_die_for_test

        batches_done = 0
        user_on_batch = on_batch

        def save_now() -> None:
            if pool is not None:
                settle(True)
            flush()

        def on_batch() -> None:
            nonlocal batches_done
            batches_done += 1
            if user_on_batch is not None:
                user_on_batch()
            maybe_die_for_test(batches_done, save_now)

    if maps == "png" and map_range is not None:
        save_scale()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="scoring", dynamic_ncols=True)
    t0 = time.perf_counter()
    last_flush = t0
    try:
        if todo:
            stream = scorer.score_paths(
                todo, return_maps=maps != "none", return_images=maps == "png", on_batch=on_batch
            )
            for r in stream:
                row = {"path": r.path, "score": "" if r.score is None else format(r.score, ".9g"), "error": r.error or ""}
                if not r.ok:
                    summary.failed += 1
                    summary.errors.append((r.path, r.error))
                    new[r.path] = row
                elif pool is None:
                    summary.scored += 1
                    new[r.path] = row
                else:
                    summary.scored += 1
                    if maps == "png" and map_range is None:
                        held.append((r, row))
                        if len(held) >= scorer.batch_size:
                            fix_scale_and_release()
                    else:
                        submit(r, row)
                    if len(futures) > 4 * scorer.batch_size:
                        concurrent.futures.wait([futures[0][0]])
                        settle(False)
                if bar is not None:
                    bar.update(1)
                    if summary.failed:
                        bar.set_postfix(errors=summary.failed, refresh=False)
                now = time.perf_counter()
                if now - last_flush >= flush_seconds:
                    if pool is not None:
                        settle(False)
                    flush()
                    last_flush = now
    finally:
        if pool is not None:
            try:
                if held:
                    fix_scale_and_release()
            finally:
                settle(True)
                pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - t0
        flush()
    if threshold is not None:
        scores = [float(r["score"]) for r in new.values() if _row_done(r)]
        scores += [float(old[p]["score"]) for p in done]
        summary.anomalous = sum(1 for v in scores if v >= threshold)
    summary.map_range = map_range if maps == "png" else None
    return summary


def _score_sharded(
    scorer: Scorer,
    paths: list[str],
    out: Path,
    maps: str,
    threshold: float | None,
    resume: bool,
    overwrite: bool,
    map_range: tuple[float, float] | None,
    progress: bool,
    flush_seconds: float,
    on_batch: Callable[[], None] | None,
) -> ScoreSummary:
    """:func:`score_to_folder` on every rank of a process group (see there)."""
    from . import distributed as ddp

    rank, world = ddp.rank(), ddp.world_size()
    t0 = time.perf_counter()
    csv_path = out / CSV_NAME
    maps_dir = out / MAPS_DIR
    names = map_names(paths, "." + maps) if maps != "none" else {}
    kept: dict = {}  # rank 0: the earlier run's rows

    def prepare():
        parts = _part_files(out)
        old_rows: list[dict] = []
        if csv_path.exists() or parts:
            if resume:
                old_rows = _previous_rows(out)
            elif not overwrite:
                raise _exists_error(csv_path, parts)
        out.mkdir(parents=True, exist_ok=True)
        in_input = set(paths)
        old = {r["path"]: r for r in old_rows}
        extra = [r for r in old_rows if r["path"] not in in_input]  # kept: results are never dropped
        if parts or (overwrite and not resume and csv_path.exists()):
            # One scores.csv with what is kept (nothing, with overwrite), and no parts: the parts
            # this run writes are then all new, and a crash leaves nothing stale behind.
            rows = [old[p] for p in paths if p in old] + extra
            _atomic_write_text(csv_path, _csv_text([_finish_row(r, threshold) for r in rows], threshold is not None))
            _unlink_parts(out)
        rng = map_range
        scale_path = maps_dir / SCALE_NAME
        if maps == "png" and rng is None and resume and scale_path.is_file():
            try:
                saved = json.loads(scale_path.read_text())
                rng = (float(saved["lo"]), float(saved["hi"]))
            except (OSError, ValueError, KeyError, TypeError):
                rng = None
        done = {
            p for p in paths
            if p in old and _row_done(old[p]) and (maps == "none" or (maps_dir / names[p]).is_file())
        }
        kept.update(old=old, extra=extra, done=done)
        return [p for p in paths if p not in done], len(done), rng

    todo, skipped, map_range = ddp.run_on_main(prepare)

    if maps == "png" and map_range is None and todo:
        # The colour range of the first batch's maps, as one process takes it, for every rank.
        def first_range():
            seen: list[np.ndarray] = []
            stream = scorer.score_paths(todo, return_maps=True)
            try:
                for r in stream:
                    if r.ok:
                        seen.append(r.map)
                        if len(seen) >= scorer.batch_size:
                            break
            finally:
                stream.close()
            if not seen:
                return None
            lo = float(min(m.min() for m in seen))
            hi = float(max(m.max() for m in seen))
            return (lo, hi if hi > lo else lo + 1e-6)

        map_range = ddp.run_on_main(first_range)

    # Whole batches of the single-process order per rank: the same batches, the same results.
    mine = ddp.shard(todo, rank, world, block=scorer.batch_size)
    if mine:
        local = _score_local(scorer, mine, out, maps, threshold, False, True, map_range, progress and rank == 0,
                             flush_seconds, on_batch, part=(rank, world), all_paths=paths)
    else:
        local = ScoreSummary(csv_path=out / PARTS_DIR / part_name(rank, world))
    ddp.barrier()
    stats = ddp.gather_object((local.scored, local.failed, local.errors))

    def merge() -> ScoreSummary:
        new: dict[str, dict] = {}
        for f in _part_files(out):
            for r in read_scores_csv(f):
                new[r["path"]] = r
        old, extra = kept["old"], kept["extra"]
        rows = [new[p] if p in new else old[p] for p in paths if p in new or p in old] + extra
        final = [_finish_row(r, threshold) for r in rows]
        _atomic_write_text(csv_path, _csv_text(final, threshold is not None))
        _unlink_parts(out)
        index = {p: i for i, p in enumerate(paths)}
        summary = ScoreSummary(
            csv_path=csv_path,
            scored=sum(s[0] for s in stats),
            failed=sum(s[1] for s in stats),
            skipped=skipped,
            errors=sorted((e for s in stats for e in s[2]), key=lambda e: index.get(e[0], len(index))),
            map_range=map_range if maps == "png" else None,
        )
        if threshold is not None:
            summary.anomalous = sum(1 for r in final[:len(final) - len(extra)]
                                    if _row_done(r) and float(r["score"]) >= threshold)
        summary.seconds = time.perf_counter() - t0
        return summary

    return ddp.run_on_main(merge)
