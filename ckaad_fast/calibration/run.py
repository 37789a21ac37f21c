"""Calibrate a model: score a calibration set by the execution plan's engine and precision
(:mod:`ckaad_fast.runtime.plan`), quantizing to int8 first where asked, and pick its thresholds."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..data.files import check_one_size
from ..errors import ArgumentError
from ..evaluation import predict_dataset
from ..model import fingerprint
from ..precision import precision_name
from ..runtime.engines import engine_module
from ..runtime.plan import check_memory_engine, plan_device, plan_engine, plan_precision, uses_memory
from ..runtime.quantize import DEFAULT_MAX_AUROC_DROP, DEFAULT_SCOPE, QuantizedGraph, check_resolves, quantize_graph
from .sets import NormalItems
from .thresholds import PIXEL_FPR, TARGET_FPR, Calibration, calibration_from_scores, check_set_size

__all__ = ["calibrate", "check_calibration_out", "INT8_RANGE_IMAGES"]


def calibrate(model, dataset, target_fpr: float = TARGET_FPR, batch_size: int = 16, device=None,
              progress: bool = False, precision: str | None = None, on_training_images: bool = False,
              engine: str | None = None, check=None, max_auroc_drop: float = DEFAULT_MAX_AUROC_DROP,
              int8_scope: str = DEFAULT_SCOPE) -> Calibration:
    """Score ``dataset`` (items ``(image, label, [mask,] path)``, never the test set) with ``model``
    on ``device``, in ``precision``, by ``engine``, each None for the execution plan's default
    (:mod:`ckaad_fast.runtime.plan`: float32, and the fastest engine here, which a Scorer of the
    calibrated checkpoint then uses too) and pick
    its :class:`Calibration`. ``on_training_images=True`` records that the set is the model's own
    training images (an explicit override; see :func:`check_calibration_split`).

    ``precision="int8"`` first quantizes the model's graph (:mod:`ckaad_fast.runtime.quantize`;
    ``int8_scope``) on the set's normal images, with accuracy control on ``check`` (a data set of
    normal and anomalous images held out from training; None: the calibration set itself when it
    holds both) within ``max_auroc_drop``, then picks the threshold on the quantized graph's
    scores: the calibration carries the graph (``int8_graph``) and its report (``quantization``)."""
    if isinstance(dataset, NormalItems):  # all normal: too small a set is refused before any scoring
        check_set_size(len(dataset), 0, target_fpr)
    device = plan_device("calibrate", device)
    dtype = plan_precision("calibrate", precision, None, device, "precision")
    name = plan_engine("calibrate", engine, None, device, dtype, uses_memory(model.config))
    check_memory_engine(model.config, name)
    if getattr(model.config, "tiling", None) is not None:  # refused before anything is scored
        if dtype == torch.int8:
            raise ArgumentError("precision", "int8 is not available for a tiled model yet (its quantized graph "
                                             "would score tiles, not the stitched image): calibrate in float32")
        check_one_size(getattr(dataset, "paths", None) or getattr(getattr(dataset, "dataset", None), "paths", None),
                       "the calibration set", "a tiled model's pixel threshold is picked over maps of one size")
    graph = None
    if dtype == torch.int8:
        graph = _quantized(model, dataset, check, max_auroc_drop, int8_scope)
    scorer, dtype = engine_module(model, name, dtype, graph)
    # Maps only where masks ask for them: a set of normal images keeps each map's range alone.
    pred = predict_dataset(scorer, dataset, batch_size=batch_size, device=device, progress=progress, precision=dtype,
                           keep_maps="masked", normal_top_share=PIXEL_FPR)
    cal = calibration_from_scores(pred.labels, pred.scores, target_fpr, masks=pred.masks, maps=pred.maps,
                                  map_range=pred.map_range, normal_top=pred.normal_top,
                                  normal_pixels=pred.normal_pixels,
                                  precision=precision_name(dtype), device=device.type,
                                  paths=pred.paths, on_training_images=on_training_images, engine=name)
    if graph is not None:
        cal.quantization, cal.int8_graph = dict(graph.report), graph
    return cal


#: At most this many normal images set the quantization ranges (NNCF's own default).
INT8_RANGE_IMAGES = 300


def _quantized(model, dataset, check, max_auroc_drop, scope) -> QuantizedGraph:
    """The int8 graph of ``model`` (see :func:`calibrate`): ranges from ``dataset``'s normal images
    (at most INT8_RANGE_IMAGES, evenly spread), accuracy control on ``check``. Each set is read
    once (decoding is the cost here)."""
    items = [dataset[i][:2] for i in range(len(dataset))]
    normal = [x for x, label in items if int(label) == 0]
    pick = np.linspace(0, len(normal) - 1, min(len(normal), INT8_RANGE_IMAGES)).astype(int)
    images = [normal[j].numpy() for j in pick]
    if check is not None:
        items = [check[i][:2] for i in range(len(check))]
    elif not 0 < len(normal) < len(items):  # no check given, and the set does not hold both kinds
        items = None
    else:  # the calibration set as the check: only where it can measure the bound
        try:
            check_resolves(len(normal), len(items) - len(normal), max_auroc_drop)
        except ArgumentError:
            items = None
    held = None if items is None else ([x.numpy() for x, _ in items], [int(label) for _, label in items])
    return quantize_graph(model, fingerprint(model), model.config.topk, images, held, max_auroc_drop, scope)


def check_calibration_out(out) -> None:
    """Refuse, before anything is scored, an ``out`` that cannot take the calibrated checkpoint."""
    if out is None:
        return
    path = os.fspath(out)
    if os.path.isdir(path):
        raise ArgumentError("out", f"{path!r} is a folder: name the checkpoint file to write (e.g. {path}/calibrated.pt)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ArgumentError("out", f"folder {parent!r} does not exist")
