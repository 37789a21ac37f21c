"""Execution engines behind the :class:`~ckaad_fast.scoring.Scorer`: who runs the forward.

- ``torch``: the detector's PyTorch forward with the fused ops (eager, ``torch.compile``, CUDA
  graphs): the GPU path, and the only one that runs on a GPU here.
- ``onnxruntime`` and ``openvino``: the same forward exported as a graph of standard operators
  (:class:`.graphs.EngineGraph`: normalised float32 images in, scores and maps out) and
  run by that runtime on the CPU. Batch-norm folding, prepacked weights and fused convolutions
  are what these runtimes do and eager PyTorch does not; the benchmark
  (``benchmarks/bench_scoring.py``, docs/BENCHMARKS.md) measures what that is worth.
- ``auto``: on a GPU, ``torch``; on the CPU, ``openvino`` if it is installed, else
  ``onnxruntime`` if it is, else ``torch`` (the order of the CPU rows of the benchmark).

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

Precision: ONNX Runtime computes in float32 only here (its CPU convolutions have no bfloat16
kernels). OpenVINO takes float32, and bfloat16 (its inference-precision hint) on CPUs with
bfloat16 units; elsewhere it would compute float32 whatever the hint, so bfloat16 is refused
there (and ``auto`` picks torch, which emulates it, for a bfloat16 request). int8 is OpenVINO's
alone: it runs the quantized copy of the graph that an int8 calibration made and carries
(:mod:`.quantize`), never a graph quantized on the fly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic import STALE_AFTER_S, atomic_path, atomic_write_text, remove_stale_temporaries
from ..errors import ArgumentError
from ..head import tiled_forward
from ..precision import cpu_has_bf16_matmul

__all__ = ["ENGINES", "RUNTIME_ENGINES", "resolve_engine", "cache_folder", "RuntimeEngine",
           "RuntimeModule", "build_runtime_engine", "engine_graph_file", "cached_engine_graph",
           "cached_graph_problem", "CachedGraphWarning", "GRAPH_RECORD"]

#: The record beside a cached engine graph (see the module).
GRAPH_RECORD = "engine.json"


class CachedGraphWarning(UserWarning):
    """A cached engine graph did not match its record and was exported again."""

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
#: The engines that run an exported graph (on the CPU).
RUNTIME_ENGINES = ("onnxruntime", "openvino")
#: ``auto``'s order on the CPU, fastest first (see the module and docs/BENCHMARKS.md).
_CPU_ORDER = ("openvino", "onnxruntime")


def _installed(name: str) -> bool:
    # The runtime's module has the engine's name; the graph export needs torch's ONNX exporter,
    # which needs onnxscript.
    return importlib.util.find_spec(name) is not None and importlib.util.find_spec("onnxscript") is not None


def resolve_engine(engine: str, device: torch.device, dtype: torch.dtype) -> str:
    """The engine a Scorer on ``device`` in ``dtype`` uses for ``engine`` (see the module);
    :class:`~ckaad_fast.errors.ArgumentError` naming ``engine`` for one that cannot run here."""
    if engine not in ENGINES:
        raise ArgumentError("engine", f"must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        if device.type != "cpu":
            return "torch"
        usable = [e for e in _CPU_ORDER if _installed(e) and _supports(e, dtype)]
        if not usable and dtype == torch.int8:
            raise ArgumentError("engine", "int8 runs on the openvino engine, which is not installed here: "
                                          "pip install 'ckaad_fast[export]'")
        return usable[0] if usable else "torch"
    if engine == "torch" and dtype != torch.int8:
        return engine
    if device.type != "cpu":
        raise ArgumentError("engine", f"{engine} runs on the CPU here; on {device.type} use torch (or auto)")
    if not _installed(engine):
        raise ArgumentError("engine", f"{engine} is not installed: pip install 'ckaad_fast[export]'")
    if not _supports(engine, dtype):
        if dtype == torch.int8:
            raise ArgumentError("engine", f"{engine} cannot run the int8 graph (openvino only): use engine openvino "
                                          "(or auto), or dtype float32 to score the float model instead")
        raise ArgumentError("engine", f"{engine} cannot compute in {str(dtype).removeprefix('torch.')} here (onnxruntime: "
                                      "float32 only; openvino: bfloat16 only on a CPU with bfloat16 units): pass "
                                      "dtype float32, or engine torch")
    return engine


def _supports(engine: str, dtype: torch.dtype) -> bool:
    if engine == "torch":
        return dtype != torch.int8
    if dtype == torch.int8:
        return engine == "openvino"
    if engine == "onnxruntime" or dtype != torch.bfloat16:
        return dtype == torch.float32
    # OpenVINO computes bfloat16 only where the CPU multiplies it, and float32 elsewhere whatever
    # it is told: asked for bfloat16 on such a CPU, it would not compute what was asked.
    return cpu_has_bf16_matmul()


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


class RuntimeEngine:
    """A runtime running the engine graph on the CPU: ``engine(x)`` takes normalised float32
    images (B, 3, H, W) and returns ``(scores (B,), maps (B, H, W))`` as float32 torch tensors.
    ``source``: the graph's file, or (OpenVINO) a model in memory: an int8 calibration's
    quantized graph, whose precision is its quantizers' (compiled with the float32 hint for the
    operations left in float)."""

    def __init__(self, name: str, source, dtype: torch.dtype, threads: int):
        self.name = name
        self.path = source if isinstance(source, Path) else None
        if name == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
            self._run = lambda x: self._session.run(None, {"image": x})
            self.dtype = torch.float32
        else:
            import openvino as ov

            hint = "bf16" if dtype == torch.bfloat16 else "f32"
            core = ov.Core()
            model = str(source) if isinstance(source, Path) else source
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "INFERENCE_NUM_THREADS": threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})
            self._compiled = compiled
            self._request = compiled.create_infer_request()
            outs = compiled.outputs

            def run(x):
                # The input is a contiguous array the call outlives: no copy of it. The outputs
                # are copies (OpenVINO's default), owned by the caller.
                r = self._request.infer({0: x}, share_inputs=True)
                return [r[o] for o in outs]

            self._run = run
            # What OpenVINO really runs in: bf16 only where the CPU has bf16 units.
            real = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
            self.dtype = torch.int8 if dtype == torch.int8 else torch.bfloat16 if "bf16" in real else torch.float32

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        score, amap = self._run(arr)
        return torch.from_numpy(np.asarray(score, dtype=np.float32)), torch.from_numpy(np.asarray(amap, dtype=np.float32))


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

    def tiled(self, images: torch.Tensor, precision=None, batch: int = 16):
        """The engine on each full-size image's tiles, stitched (:meth:`ckaad_fast.model.Detector.tiled`)."""
        return tiled_forward(self.engine, images, self.config.tiling, self.config.image_size, self.config.topk, batch)


def build_runtime_engine(name: str, model, fingerprint: str, topk, dtype: torch.dtype,
                         quantized=None) -> RuntimeEngine:
    """The runtime engine ``name`` for ``model`` (its graph from the cache, exported on first use;
    for int8, ``quantized``: the calibration's :class:`~.quantize.QuantizedGraph`, which must be
    of this model at this top-k)."""
    if dtype != torch.int8:
        return RuntimeEngine(name, engine_graph_file(model, fingerprint, topk), dtype, torch.get_num_threads())
    if quantized is None:
        raise ArgumentError("dtype", "int8 needs a checkpoint calibrated in int8 (ckaad-fast calibrate --dtype int8), "
                                     "which carries the quantized graph")
    quantized.check_for(fingerprint, topk)
    return RuntimeEngine(name, quantized.openvino_model(), dtype, torch.get_num_threads())
