"""What a Scorer runs in, chosen once: its precision and its engine, following the model's
calibration unless told otherwise, so that the calibration's decisions are the Scorer's (see
:mod:`ckaad_fast.precision` and :mod:`ckaad_fast.runtime.engines`); and whether it needs the
PyTorch network at all (:func:`graph_detector`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import ArgumentError
from ..model import ModelConfig, checkpoint_fingerprint, config_from_checkpoint
from ..precision import cpu_has_bf16_matmul, precision_name, resolve_device, resolve_precision
from ..runtime import RUNTIME_ENGINES, resolve_engine
from ..runtime.engines import cached_engine_graph, cached_graph_problem

__all__ = ["scoring_dtype", "scoring_engine", "GraphDetector", "graph_detector"]


def scoring_dtype(dtype, calibration, device) -> torch.dtype:
    """The Scorer's precision: the one asked for, else the calibration's, else "auto"; a warning
    when it differs from the calibration's (see :class:`Scorer`)."""
    calibrated = None if calibration is None else (calibration.precision or "float32")
    chosen = resolve_precision(dtype if dtype is not None else (calibrated or "auto"), device, "dtype", int8=True)
    if calibrated is not None and precision_name(chosen) != calibrated:
        warnings.warn(
            f"scoring in {precision_name(chosen)} a model calibrated in {calibrated}: scores move by about 1e-3 "
            f"relative (up to 3e-2; int8 more), so images near the threshold can be decided differently from the "
            f"calibration's promise; leave dtype out (or pass {calibrated!r}) to score as it was calibrated",
            UserWarning, stacklevel=3)
    if chosen == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_matmul():
        warnings.warn(
            "scoring in bfloat16 on a CPU without bfloat16 matrix units (AMX, AVX-512 BF16): it is emulated, about "
            "12x slower than float32 (measured on a 2-core AVX2 EPYC); calibrate in float32 for such machines",
            UserWarning, stacklevel=3)
    if calibration is not None and calibration.device not in (None, device.type):
        warnings.warn(
            f"scoring on {device.type} a model calibrated on {calibration.device}: the two compute float32 "
            "convolutions differently (a GPU uses TF32 by default), which moves scores by about 1e-4 relative; "
            "images that close to the threshold can be decided differently from the calibration's promise",
            UserWarning, stacklevel=3)
    return chosen


def scoring_engine(engine: str | None, calibration, device: torch.device, dtype: torch.dtype,
                   torch_only: bool) -> str:
    """The Scorer's engine. None: the calibration's (the engine whose scores the threshold was
    picked on), and torch for a model without one; otherwise the one asked for ("auto": the
    fastest here, :func:`~ckaad_fast.runtime.resolve_engine`). "torch" whenever ``torch_only``
    (compile or CUDA graphs were asked for). A warning when a calibrated model is scored by
    another engine than its calibration's: float32 engines agree to about 1e-6 relative, so only
    an image that close to the threshold can be decided differently."""
    if dtype == torch.int8:  # the calibration's quantized graph, which only OpenVINO runs
        if torch_only:
            raise ArgumentError("dtype", "int8 runs on the openvino engine; compile and cuda_graphs are torch's")
        return resolve_engine("openvino" if engine in (None, "auto") else engine, device, dtype)
    calibrated = None if calibration is None else (calibration.engine or "torch")
    if torch_only and engine in (None, "auto"):
        chosen = "torch"
    elif engine is None:
        if calibrated is None:
            return "torch"
        try:
            return resolve_engine(calibrated, device, dtype)
        except ValueError as e:  # not installed here, or not for this device or precision
            warnings.warn(f"the model was calibrated with the {calibrated} engine, which cannot run here ({e}); "
                          "scoring with torch", UserWarning, stacklevel=3)
            return "torch"
    else:
        chosen = resolve_engine(engine, device, dtype)
    if calibrated is not None and chosen != calibrated:
        warnings.warn(
            f"scoring with the {chosen} engine a model calibrated with {calibrated}: their float32 scores differ "
            f"by about 1e-6 relative, so an image that close to the threshold can be decided differently from the "
            f"calibration's promise; leave the engine out (or pass {calibrated!r}) to score as it was calibrated",
            UserWarning, stacklevel=3)
    return chosen


@dataclass(frozen=True)
class GraphDetector:
    """A detector known by its configuration and fingerprint only, for a Scorer whose runtime
    engine runs a graph that is already there (the engine cache's, or an int8 calibration's):
    such a Scorer never builds the PyTorch network, which on a 2-core CPU cost 2.2 s of a
    14 s ``ckaad-fast score`` (docs/BENCHMARKS.md)."""

    config: ModelConfig
    fingerprint: str


def graph_detector(ckpt: dict, calibration, device, options: dict) -> GraphDetector | None:
    """The :class:`GraphDetector` of a checkpoint dict when a Scorer with these ``options``
    (Scorer's keyword arguments) on ``device`` would run a runtime engine whose graph needs no
    export; None otherwise (and whenever an option is wrong: the Scorer built the usual way
    says what is wrong)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Scorer itself warns, once
            dev = resolve_device(device)
            dtype = scoring_dtype(options.get("dtype"), calibration, dev)
            torch_only = bool(options.get("compile") or options.get("cuda_graphs"))
            engine = scoring_engine(options.get("engine"), calibration, dev, dtype, torch_only)
        if engine not in RUNTIME_ENGINES:
            return None
        config = config_from_checkpoint(ckpt)
        topk = options.get("topk")
        topk = config.topk if topk is None else (None if topk == "mean" else topk)
        weights = checkpoint_fingerprint(ckpt)
    except (ValueError, TypeError):
        return None
    if dtype == torch.int8 or cached_graph_problem(cached_engine_graph(weights, topk), weights, topk) is None:
        return GraphDetector(config, weights)
    return None
