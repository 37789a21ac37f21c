"""The scoring engine: run a trained detector on images as fast as the hardware allows.

:class:`Scorer` wraps a :class:`~ckaad_fast.model.Detector` for inference:

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

On the CPU the same API runs the CPU paths of the ops; the backbone and auto-encoder in bfloat16
autocast (channels_last) where the CPU has bfloat16 matrix units, else (or with dtype="float32")
in float32.

The forward is the detector's own (:meth:`ckaad_fast.model.Detector.forward`, through the one
inference head): the Scorer only adds the device, the memory layout, compilation, CUDA graphs and
streaming. A calibrated model is scored by default in the precision its calibration was computed
in, so that the calibration's decisions are the Scorer's (see :mod:`ckaad_fast.precision`).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from ..calibration import read_calibration
from ..data import list_images
from ..head import InferenceHead, tiled_forward
from ..data.images import normalise_pixels
from ..model import Detector, fingerprint, load_checkpoint, model_from_checkpoint
from ..precision import channels_last_for, precision_name
from ..profiling import nvtx_enabled, stage
from ..errors import ArgumentError
from ..signal_stack import ensure_signal_stack
from .choices import GraphDetector, graph_detector
from .decoding import DecodeDataset, collate, default_workers, worker_init
from .stream import NON_FINITE_ERROR, ScoreResult, stream_results
from ..runtime import build_runtime_engine
from ..runtime.plan import (RUNTIME_ENGINES, check_memory_engine, plan_device, plan_engine, plan_precision, plan_topk,
                            uses_memory)

__all__ = ["Scorer", "ScoreResult", "NON_FINITE_ERROR"]  # the last two: .stream's


class Scorer:
    """Fast inference with a trained :class:`~ckaad_fast.model.Detector`.

    Args:
        model: the detector (moved to ``device`` and put in eval mode; not copied), or a
            :class:`.choices.GraphDetector` (:meth:`from_checkpoint` makes one when it can).
        device: "cpu" or "cuda[:N]"; None: the execution plan's default (a GPU where one is
            usable, else the CPU; :mod:`ckaad_fast.runtime.plan` decides device, dtype, engine
            and topk for every path, by one rule: what was asked, else the calibration's, else
            the default).
        dtype: precision of the backbone and the auto-encoder (:mod:`ckaad_fast.precision`):
            None follows the calibration (float32 for calibrations older than that record) and,
            for a model without one, "auto": bfloat16 on CUDA and on a CPU with bfloat16 matrix
            units, float32 on other CPUs; "float32", "bfloat16" (autocast), "float16" (CUDA only)
            or "int8" (an int8 calibration's graph). Maps and scores are float32 whatever the
            dtype. Another precision than the calibration's is allowed, warned about and
            recorded in run.json.
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
        calibration: the model's :class:`~ckaad_fast.calibration.Calibration`, which
            :func:`~.runner.score_to_folder` turns into normalised scores and decisions
            (:meth:`from_checkpoint` reads it from the checkpoint).
        engine: who runs the forward (:mod:`ckaad_fast.runtime.plan`): None follows the
            calibration (the engine its scores came from; torch for calibrations older than
            that record) and, for a model without one, "torch"; "torch" is the PyTorch forward
            with the fused ops (compile and cuda_graphs are its options); "onnxruntime" and
            "openvino" run the exported graph on the CPU (float32; OpenVINO also bfloat16);
            "auto" picks torch on a GPU and the fastest installed runtime on the CPU. Another
            engine than the calibration's is allowed, with a warning. :attr:`engine` is the one
            chosen, recorded in every results folder's run.json.
    """

    def __init__(
        self,
        model: Detector,
        device=None,
        dtype=None,
        compile: bool = False,
        cuda_graphs: bool = False,
        batch_size: int = 16,
        num_workers: int | None = None,
        topk: int | str | None = None,
        pad_batches: bool | None = None,
        warmup: int = 3,
        calibration=None,
        engine: str | None = None,
    ):
        if not isinstance(model, (Detector, GraphDetector)):
            raise TypeError(f"model must be a ckaad_fast.model.Detector, got {type(model).__name__}")
        self.device = plan_device("score", device)
        self.dtype = plan_precision("score", dtype, calibration, self.device)
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
        #: The model's :class:`~ckaad_fast.tiling.Tiling` (None: images are resized whole).
        self.tiling = self.config.tiling
        self.topk = plan_topk(topk, self.config, self.image_size)
        self.compile = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pad_batches = (self.compile or self.cuda_graphs) if pad_batches is None else bool(pad_batches)
        self.warmup = warmup

        self._channels_last = channels_last_for(self.device, self.dtype)
        self._fingerprint: str | None = None
        if isinstance(model, GraphDetector):  # a runtime engine's graph, with no network behind it
            self.model, self.head, self._fingerprint = None, None, model.fingerprint
        else:
            model = model.eval().to(self.device)
            if self._channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.model = model
            # The model's own head, unless another top-k was asked for.
            self.head = (model.head if self.topk == model.head.topk
                         else InferenceHead(self.config.sigma, self.config.border, self.topk))
        self._mean = torch.tensor(self.config.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.config.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._fn: Callable = self._forward_eager
        if self.compile:
            self._fn = torch.compile(self._forward_eager, fullgraph=True, dynamic=False)
        self._graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_pool = None
        #: The model's :class:`~ckaad_fast.calibration.Calibration` (from its checkpoint), or None.
        self.calibration = calibration
        #: The engine that runs the forward ("torch", "onnxruntime" or "openvino"; see .engines).
        self.engine = plan_engine("score", engine, calibration, self.device, self.dtype,
                                  self.compile or self.cuda_graphs or uses_memory(self.config))
        check_memory_engine(self.config, self.engine)
        self._runtime = None
        if self.model is None and self.engine not in RUNTIME_ENGINES:
            raise ArgumentError("engine", f"a GraphDetector runs on a runtime engine only, not {self.engine}")
        if self.engine in RUNTIME_ENGINES:
            if self.compile or self.cuda_graphs:
                raise ArgumentError("engine", f"compile and cuda_graphs are the torch engine's, not {self.engine}'s")
            self._runtime = build_runtime_engine(self.engine, self.model, self.fingerprint(), self.topk, self.dtype,
                                                 quantized=getattr(calibration, "int8_graph", None))
            if self._runtime.dtype != self.dtype:
                warnings.warn(f"{self.engine} computes in {precision_name(self._runtime.dtype)} on this CPU, not "
                              f"{self.precision} (it has no bfloat16 units): scoring in "
                              f"{precision_name(self._runtime.dtype)}", UserWarning, stacklevel=2)
                self.dtype = self._runtime.dtype
            self.pad_batches = False  # the graph takes any batch

    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, device=None, **kwargs) -> "Scorer":
        """A scorer for the detector saved at ``path`` (or a checkpoint dict from
        :func:`~ckaad_fast.model.load_checkpoint`; loaded with ``weights_only=True``: a file that is
        not a ckaad_fast checkpoint raises a ValueError that says so). When a runtime engine will
        run a graph that is already there, the PyTorch network is not built at all
        (:func:`.choices.graph_detector`): :attr:`model` is then None."""
        ckpt = path if isinstance(path, dict) else load_checkpoint(path, map_location="cpu")
        try:
            calibration = read_calibration(ckpt)
            model = graph_detector(ckpt, calibration, device, kwargs) or model_from_checkpoint(ckpt, map_location="cpu")
        except ValueError as e:
            raise ArgumentError("checkpoint", str(e)) from None
        return cls(model, device=device, calibration=calibration, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Scorer(backbone={c.backbone!r}, layers={c.layers}, image_size={self.image_size}, "
            f"device={str(self.device)!r}, engine={self.engine!r}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"compile={self.compile}, cuda_graphs={self.cuda_graphs}, batch_size={self.batch_size}, "
            f"topk={self.topk})"
        )

    # -------------------------------------------------------------------------------------------
    # The forward
    # -------------------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """The precision name of :attr:`dtype` ("float32", "bfloat16", "float16")."""
        return precision_name(self.dtype)

    def _forward_eager(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The detector's forward in the scorer's precision, with the scorer's head."""
        return self.model(x, self.dtype, self.head)

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
        with stage("forward"):
            if self._runtime is not None:
                return self._runtime(x)
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
        with stage("copy"):
            x = images.to(self.device, non_blocking=True)
        if normalise:
            x = normalise_pixels(x, self._mean, self._std)
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _tiled(self, images: torch.Tensor, normalise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-size images through their tiles, ``batch_size`` tiles per forward (padded like any batch)."""
        image_score = None
        if uses_memory(self.config):  # the memory looks at the normalised full image, in float32
            image_score = lambda full, maps: self.model.memory_scores(self._prepare(full, normalise), maps)  # noqa: E731
        return tiled_forward(self._run, images, self.tiling, self.image_size, self.topk, self.batch_size,
                             prepare=lambda t: self._pad(self._prepare(t, normalise)), image_score=image_score)

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
        device; equal to ``model(images)`` for the same top-k (in float32). A tiled model takes
        full-size images (at least one tile on each side) and returns maps at their size, equal
        to ``model.tiled(images)``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must have shape (B >= 1, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be normalised floating-point tensors, got {images.dtype} "
                "(score_paths decodes and normalises files for you)"
            )
        if self.tiling is not None:
            return self._tiled(images)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but the model was trained at "
                f"{self.image_size[0]}x{self.image_size[1]}: resize them (score_paths does)"
            )
        # A short batch is padded to batch_size (pad_batches), so that the one compiled graph
        # and the one CUDA graph of a stream serve it; the padding's rows are dropped.
        n = images.shape[0]
        scores, maps = self._run(self._pad(self._prepare(images, normalise=False)))
        scores, maps = scores[:n], maps[:n]
        if self.cuda_graphs:
            scores, maps = scores.clone(), maps.clone()
        return scores, maps

    def fingerprint(self) -> str:
        """SHA-256 of the model's configuration and weights (:func:`ckaad_fast.model.fingerprint`),
        computed once: what a results folder's manifest records."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise raw images (uint8 in [0, 255], or floats in [0, 1]) as the model expects."""
        return normalise_pixels(images.to(self._mean.device), self._mean, self._std)

    # -------------------------------------------------------------------------------------------
    # Streaming
    # -------------------------------------------------------------------------------------------
    def _workers(self, n_paths: int) -> int:
        return default_workers(self.num_workers, n_paths, self.batch_size, self.device)

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
        # A tiled model decodes each file at its own size, one at a time, and batches its tiles.
        if nw > 0 and threading.current_thread() is threading.main_thread():
            ensure_signal_stack()  # the workers' SIGCHLD handler must fit (ckaad_fast.signal_stack)
        ds = DecodeDataset(paths, None if self.tiling else self.image_size, nvtx_enabled(), self.tiling)
        return DataLoader(
            ds,
            batch_size=1 if self.tiling else self.batch_size,
            shuffle=False,
            num_workers=nw,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init if nw > 0 else None,
            prefetch_factor=2 if nw > 0 else None,
        )

    def _launch(self, imgs: torch.Tensor, return_maps: bool):
        """Run one decoded batch; returns host buffers being filled and an event (CUDA) to wait on."""
        n = imgs.shape[0]
        with torch.inference_mode():
            if self.tiling is not None:
                scores, maps = self._tiled(imgs, normalise=True)
            else:
                scores, maps = self._run(self._pad(self._prepare(imgs, normalise=True)))
            with stage("readback"):
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
        return stream_results(self._loader(paths), self._launch, paths, return_maps, return_images, on_batch)
