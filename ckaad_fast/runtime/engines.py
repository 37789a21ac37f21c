"""Execution engines behind the :class:`~ckaad_fast.scoring.Scorer`: who runs the forward.

- ``torch``: the detector's PyTorch forward with the fused ops (eager, ``torch.compile``, CUDA
  graphs): the GPU path, and the only one that runs on a GPU here.
- ``onnxruntime`` and ``openvino``: the same forward exported as a graph of standard operators
  (:class:`.graphs.EngineGraph`: normalised float32 images in, scores and maps out) and
  run by that runtime on the CPU. Batch-norm folding, prepacked weights and fused convolutions
  are what these runtimes do and eager PyTorch does not; the benchmark
  (``benchmarks/bench_scoring.py``, docs/BENCHMARKS.md) measures what that is worth.
- which engine runs where and in which precision, and what ``auto`` picks, is the execution
  plan's capability table (:mod:`.plan`); each runtime is one class in a file of its own
  (:mod:`.onnxruntime_engine`, :mod:`.openvino_engine`) behind one interface (:mod:`.engine_base`).

Everything else stays the Scorer's: decoding, normalisation (so 16-bit images are scored as by the
PyTorch engine), streaming, error rows, decisions and the results folder. The graph a runtime
engine loads is exported once per model, top-k and tool version and kept in a cache folder
(``$CKAAD_FAST_CACHE``, else ``$XDG_CACHE_HOME/ckaad_fast``, else ``~/.cache/ckaad_fast``),
written atomically; a later Scorer of the same model loads it in a fraction of a second.

A cached graph is bound to its model: beside it, ``engine.json`` records the model's fingerprint,
the top-k and the graph's SHA-256 and size, written after the graph is complete (its nodes
named). At load, a graph without that record (an interrupted export), of another model, or whose
bytes differ (truncated, edited) is exported again, with a one-line :class:`CachedGraphWarning`;
where no model is at hand to export it, the graph is not used (the caller builds the network).

int8 is OpenVINO's alone: it runs the quantized copy of the graph that an int8 calibration made
and carries (:mod:`.quantize`), never a graph quantized on the fly.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..atomic import STALE_AFTER_S, atomic_path, atomic_write_text, remove_stale_temporaries
from ..errors import ArgumentError
from ..head import tiled_forward
from ..model import fingerprint as model_fingerprint
from .engine_base import RuntimeEngine
from .onnxruntime_engine import OnnxRuntimeEngine
from .openvino_engine import Int8OpenVinoEngine, OpenVinoEngine

__all__ = ["cache_folder", "RuntimeEngine", "engine_module",
           "RuntimeModule", "build_runtime_engine", "engine_graph_file", "cached_engine_graph",
           "cached_graph_problem", "CachedGraphWarning", "GRAPH_RECORD"]

#: The record beside a cached engine graph (see the module).
GRAPH_RECORD = "engine.json"


class CachedGraphWarning(UserWarning):
    """A cached engine graph did not match its record and was exported again."""

def cache_folder() -> Path:
    """Where runtime engines keep their exported graphs (see the module)."""
    root = os.environ.get("CKAAD_FAST_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckaad_fast"


def cached_engine_graph(fingerprint: str, topk) -> Path:
    """Where the engine graph of the model ``fingerprint`` at ``topk`` is cached (it may not be
    there yet): keyed by the model, the top-k and the versions that exported it."""
    # "g3": nodes named by the detector's part (graphs.GRAPH_PARTS), which quantization reads,
    # and a record binding the graph to its model (GRAPH_RECORD).
    key = f"{fingerprint[:24]}-top{'mean' if topk is None else topk}-g3-{__version__}-torch{torch.__version__}"
    return cache_folder() / "engines" / key / "engine.onnx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _topk_key(topk) -> str:
    return "mean" if topk is None else str(int(topk))


def cached_graph_problem(target: Path, fingerprint: str, topk) -> str | None:
    """Why the cached engine graph at ``target`` is not the model ``fingerprint``'s at ``topk``
    (None: it is, whole)."""
    if not target.is_file():
        return "is not there"
    try:
        record = json.loads(target.with_name(GRAPH_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "has no record of its model (an interrupted export?)"
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint or record.get("topk") != _topk_key(topk):
        return "was recorded for another model or top-k"
    try:
        if record.get("bytes") != target.stat().st_size or record.get("sha256") != _sha256(target):
            return "differs from its recorded checksum (truncated or edited)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def engine_graph_file(model, fingerprint: str, topk) -> Path:
    """The cached engine graph of ``model`` at ``topk``, checked against its record (see the
    module) and exported when missing or wrong (``model`` None: it must be in the cache, whole)."""
    target = cached_engine_graph(fingerprint, topk)
    problem = cached_graph_problem(target, fingerprint, topk)
    if problem is None:
        return target
    if model is None:
        raise FileNotFoundError(f"no usable engine graph cached at {target}: it {problem}")
    if target.exists():
        warnings.warn(f"the cached engine graph {target} {problem}: exporting it again", CachedGraphWarning,
                      stacklevel=2)
    try:
        _export(model, fingerprint, topk, target)
    except OSError as e:
        raise RuntimeError(f"cannot write the engine graph cache {cache_folder()} ({e.strerror or e}): make it "
                           "writable, or set CKAAD_FAST_CACHE to a writable folder") from e
    return target


def _export(model, fingerprint: str, topk, target: Path) -> None:
    """Export the graph under a temporary name, name its nodes, then give it its name; the record
    goes last, so that a graph without one is never trusted."""
    from .graphs import write_engine_onnx

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, older_than=STALE_AFTER_S)
    # Exported on a copy in float32 on the CPU: the Scorer's own model keeps its device and layout.
    import copy

    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    with atomic_path(target) as tmp:
        write_engine_onnx(cpu_model, topk, tmp)
        record = {"fingerprint": fingerprint, "topk": _topk_key(topk), "bytes": os.path.getsize(tmp),
                  "sha256": _sha256(Path(tmp)), "ckaad_fast": __version__, "torch": torch.__version__}
    atomic_write_text(target.with_name(GRAPH_RECORD), json.dumps(record, indent=1))


class RuntimeModule(torch.nn.Module):
    """A :class:`RuntimeEngine` as a detector-like module, ``module(images, precision=None) ->
    (scores, maps)``, for code that scores data sets through a model (calibration, evaluation).
    The precision is the engine's own; the argument is accepted and ignored."""

    def __init__(self, engine: RuntimeEngine, config):
        super().__init__()
        self.engine = engine
        self.config = config

    def forward(self, images: torch.Tensor, precision=None):
        return self.engine(images)

    @property
    def tiling(self):
        """The model's tiling (None: images are resized whole)."""
        return self.config.tiling

    def tiled(self, images: torch.Tensor, precision=None, batch: int = 16):
        """The engine on each full-size image's tiles, stitched (:meth:`ckaad_fast.model.Detector.tiled`)."""
        return tiled_forward(self.engine, images, self.config.tiling, self.config.image_size, self.config.topk, batch)


def engine_module(model, engine: str, dtype: torch.dtype, quantized=None):
    """``(module, dtype)``: what a data set is scored through by ``engine`` (``model`` itself for
    torch; a :class:`RuntimeModule` for a runtime engine, whose graph is ``model``'s, or for int8
    the calibration's ``quantized`` graph) and the precision it really computes in."""
    if engine == "torch":
        return model, dtype
    runtime = build_runtime_engine(engine, model, model_fingerprint(model), model.config.topk, dtype,
                                   quantized=quantized)
    return RuntimeModule(runtime, model.config), runtime.dtype


def build_runtime_engine(name: str, model, fingerprint: str, topk, dtype: torch.dtype,
                         quantized=None) -> RuntimeEngine:
    """The runtime engine ``name`` for ``model`` (its graph from the cache, exported on first use;
    for int8, ``quantized``: the calibration's :class:`~.quantize.QuantizedGraph`, which must be
    of this model at this top-k)."""
    threads = torch.get_num_threads()
    if dtype == torch.int8:
        if quantized is None:
            raise ArgumentError("dtype", "int8 needs a checkpoint calibrated in int8 (ckaad-fast calibrate --dtype "
                                         "int8), which carries the quantized graph")
        return Int8OpenVinoEngine(quantized, fingerprint, topk, threads)
    path = engine_graph_file(model, fingerprint, topk)
    if name == "onnxruntime":
        return OnnxRuntimeEngine(path, threads)
    return OpenVinoEngine(path, dtype, threads, path=path)
