"""The application service: hold out -> train -> calibrate -> save, written once.

``ckaad-fast train`` (with and without ``--calibrate``), the demo and the paper's experiments all
call :func:`fit`; none of them orchestrates these steps itself.

Hold-outs, in this order:

1. ``validation=True`` (class-labelled data, the medical protocol): the validation split comes
   off the training split first (:func:`ckaad_fast.data.carve_validation`), so that no labelled
   anomaly and no training image is ever drawn from it.
2. The coarse anomaly set: a data set, or a callable that builds it from the training split left
   after step 1 (labelled anomalies are drawn from that split's pool).
3. ``calibrate=True``: ``calibrate_share`` of the normal training images (and of the coarse
   anomalies) is held out (:func:`ckaad_fast.calibration.split_for_calibration`), and after
   training the decision threshold picked on it is written into the checkpoint, computed in
   ``precision`` (None: the execution plan's default for calibrate, :mod:`ckaad_fast.runtime.plan`;
   recorded there, and used by ``ckaad-fast score`` by default).

Under torchrun every rank trains; rank 0 alone calibrates and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from .calibration import CALIBRATE_SHARE, TARGET_FPR

__all__ = ["FitResult", "fit"]


@dataclass
class FitResult:
    """What :func:`fit` did: the training result (checkpoint, log, history, model), the data it
    trained on, and what it held out."""

    result: Any  # ckaad_fast.training.TrainResult
    train_set: Dataset
    anomaly_set: Dataset | None
    validation_set: Dataset | None = None
    calibration_set: Dataset | None = None
    calibration: Any = None  # ckaad_fast.calibration.Calibration

    @property
    def checkpoint(self) -> Path:
        return self.result.checkpoint


def fit(
    config,
    train_set: Dataset,
    out_dir: str | os.PathLike,
    anomalies: Dataset | Callable[[Dataset], Dataset | None] | None = None,
    *,
    validation: bool = False,
    calibrate: bool = False,
    calibrate_share: float = CALIBRATE_SHARE,
    target_fpr: float = TARGET_FPR,
    precision: str | None = None,
    eval_set: Dataset | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FitResult:
    """Hold out, train ``config`` on ``train_set`` into ``out_dir``, calibrate, save (see the
    module). ``anomalies``: the coarse anomaly set, or a callable building it from the training
    split left after the validation carve-out (None: no anomalies, or pseudo-anomalies as the
    strategy says). Errors of the hold-outs are raised before any training."""
    from . import distributed as ddp
    from .calibration import calibrate as calibrate_model
    from .calibration import split_for_calibration, write_calibration
    from .data import carve_validation
    from .training import train

    validation_set = calibration_set = calibration = None
    if validation:
        train_set, validation_set = carve_validation(train_set, seed=config.seed)
    anomaly_set = anomalies(train_set) if callable(anomalies) else anomalies
    if calibrate:
        train_set, anomaly_set, calibration_set = split_for_calibration(
            train_set, anomaly_set, calibrate_share, seed=config.seed, target_fpr=target_fpr)
    result = train(config, train_set, anomaly_set=anomaly_set, out_dir=out_dir, eval_set=eval_set, resume=resume,
                   progress=progress, overwrite=overwrite)
    if calibration_set is not None and ddp.is_main():
        calibration = calibrate_model(result.model, calibration_set, target_fpr=target_fpr,
                                      batch_size=config.batch_size, device=config.device, progress=progress,
                                      precision=precision)
        write_calibration(result.checkpoint, calibration)
    return FitResult(result, train_set, anomaly_set, validation_set, calibration_set, calibration)
