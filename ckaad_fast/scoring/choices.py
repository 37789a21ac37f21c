"""What a Scorer runs in, chosen once: its precision and its engine, following the model's
calibration unless told otherwise, so that the calibration's decisions are the Scorer's (see
:mod:`ckaad_fast.precision` and :mod:`ckaad_fast.runtime.engines`)."""
from __future__ import annotations

import warnings

import torch

from ..errors import ArgumentError
from ..precision import cpu_has_bf16_matmul, precision_name, resolve_precision
from ..runtime import resolve_engine

__all__ = ["scoring_dtype", "scoring_engine"]


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
