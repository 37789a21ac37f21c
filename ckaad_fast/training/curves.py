"""Training curves a person can look at: TensorBoard event files beside ``log.jsonl``.

Every finished epoch adds its losses (``loss/discriminator``, ``loss/generator``,
``loss/reconstruction``), the discriminator's mean score on the last batch's normal features,
their reconstructions and the anomalous features (``energy/normal``, ``energy/reconstructed``,
``energy/anomalous``: the adversarial game at a glance), the evaluation metrics when training
evaluates (``eval/image_auroc``, ...) and the epoch's seconds, at the epoch's step. The files go
into the run's folder, so ``tensorboard --logdir runs/`` shows every run under ``runs/``. A resumed
run drops the steps after its checkpoint's epoch (TensorBoard's purge), so the curves match the
checkpoint as ``log.jsonl`` does.

TensorBoard is optional (the ``curves`` extra): without it nothing is written and training runs
as before; ``log.jsonl`` always holds the same numbers.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["Curves", "curves_available"]


def curves_available() -> bool:
    """Whether TensorBoard's writer can be imported here."""
    return importlib.util.find_spec("tensorboard") is not None


class Curves:
    """The event-file writer of one run (a no-op when ``enabled`` is false or TensorBoard is missing)."""

    def __init__(self, out: Path, start_epoch: int, enabled: bool):
        self._writer = None
        if enabled and curves_available():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(out), purge_step=start_epoch + 1)

    def add(self, record: dict) -> None:
        """One epoch's record of the log (see the module for the names)."""
        if self._writer is None:
            return
        step = int(record["epoch"])
        scalars = {"loss/discriminator": record.get("d_loss"), "loss/generator": record.get("g_loss"),
                   "loss/reconstruction": record.get("recon_loss"), "time/epoch_seconds": record.get("seconds")}
        scalars.update({f"energy/{k}": v for k, v in (record.get("energy") or {}).items()})
        scalars.update({f"eval/{k}": v for k, v in (record.get("eval") or {}).items()})
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
