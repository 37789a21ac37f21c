"""A calibration in a checkpoint: written beside everything else it holds (with an int8
calibration's quantized graph), and read back checked."""
from __future__ import annotations

import os

from ..atomic import atomic_torch_save
from ..errors import ArgumentError
from ..model import checkpoint_file, load_checkpoint
from ..runtime.quantize import QuantizedGraph
from .thresholds import Calibration

__all__ = ["write_calibration", "read_calibration"]


def write_calibration(checkpoint, calibration: Calibration, out=None) -> str:
    """Store ``calibration`` in the checkpoint (``out``, else in place), keeping everything else it
    holds; returns the path written (atomically)."""
    path = checkpoint_file(checkpoint)
    ckpt = load_checkpoint(path)
    ckpt["calibration"] = calibration.to_dict()
    # An int8 calibration's quantized graph beside it; any other calibration drops a stale one.
    graph = getattr(calibration, "int8_graph", None)
    if calibration.precision == "int8" and graph is None:
        raise ArgumentError("calibration", "an int8 calibration without its quantized graph (int8_graph): "
                                           "calibrate with precision int8 to make one")
    ckpt.pop("int8_graph", None)
    if calibration.precision == "int8":
        ckpt["int8_graph"] = graph.to_checkpoint()
    target = os.fspath(out) if out is not None else os.fspath(path)
    atomic_torch_save(ckpt, target)
    return target


def read_calibration(ckpt: dict) -> Calibration | None:
    """The calibration a checkpoint dict holds, or None (checkpoints older than calibration)."""
    raw = ckpt.get("calibration")
    if not raw:
        return None
    try:
        cal = Calibration.from_dict(dict(raw))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the checkpoint's calibration is invalid: {e}") from None
    if cal.precision == "int8":
        if not ckpt.get("int8_graph"):
            raise ValueError("the checkpoint's calibration is int8 but its quantized graph is missing: calibrate again")
        cal.int8_graph = QuantizedGraph.from_checkpoint(ckpt["int8_graph"])
    return cal
