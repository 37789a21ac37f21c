"""Scoring a test set with a trained detector and computing the paper's metrics.

:func:`predict_dataset` runs the model over a data set (eval mode, ``torch.inference_mode``) and
collects image scores, labels, anomaly maps and, where the data set has them, ground-truth masks;
:func:`evaluate_model` passes them to :func:`ckaad_fast.metrics.evaluate`.

Under torchrun (``distributed=True``, on every rank of the process group): each rank predicts a
contiguous shard of whole batches of the data set, the shards are gathered on rank 0 in data-set order, and the
metrics, computed there from exactly the arrays a single process would have, are handed to every
rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .data.files import warn_skip
from .metrics import METRIC_TABLE, PAPER_ORDER, evaluate
from .precision import channels_last_for, resolve_precision

__all__ = ["Predictions", "evaluate_model", "predict_dataset", "format_metrics", "format_by_defect_type",
           "defect_types_of", "metrics_from_predictions", "METRIC_NAMES"]

#: What each metric key of :func:`evaluate_model` is called in tables (:data:`ckaad_fast.metrics.METRIC_TABLE`).
METRIC_NAMES = {key: name.text for key, name in METRIC_TABLE.items()}


def format_by_defect_type(metrics: dict) -> str:
    """One row per defect type (its images against the normal ones), values as percentages."""
    table = metrics.get("by_defect_type") or {}
    cols = [k for k in ("image_auroc", "pixel_auroc", "aupro") if any(k in m for m in table.values())]
    width = max([len("defect type")] + [len(t) for t in table])
    lines = ["defect type".ljust(width) + "".join(f"  {METRIC_NAMES[c].split(' (')[0]:>13}" for c in cols),
             "-" * width + "".join("  " + "-" * 13 for _ in cols)]
    for t, m in table.items():
        cells = "".join(f"  {100 * m[c]:13.2f}" if c in m else f"  {'':>13}" for c in cols)
        lines.append(f"{t.ljust(width)}{cells}  ({m['num_anomalous']} images)")
    return "\n".join(lines)


def defect_type_chart(metrics: dict):
    """The per-defect-type table as a picture: one group of bars per defect type (image AUROC,
    pixel AUROC, AUPRO in %), or None when the metrics have no ``by_defect_type``."""
    from .charts import bar_chart

    table = metrics.get("by_defect_type") or {}
    cols = [k for k in ("image_auroc", "pixel_auroc", "aupro") if any(k in m for m in table.values())]
    if not table or not cols:
        return None
    series = {METRIC_NAMES[c].split(" (")[0]: [(100 * m[c], None) if c in m else None for m in table.values()]
              for c in cols}
    low = min(v for vals in series.values() for v in (x[0] for x in vals if x is not None))
    floor = max(0.0, 10 * int(low // 10) - 10)
    width = max(560, 120 * len(table))
    return bar_chart("By defect type: its images against the normal ones", list(table), series, "%",
                     (floor, 100.0), size=(width, 360))


def format_metrics(metrics: dict) -> str:
    """A two-column table of the metrics, the paper's metrics first (values as percentages)."""
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    keys = [k for k in PAPER_ORDER if k in metrics] + [k for k in metrics if k not in PAPER_ORDER]
    rows = []
    for k in keys:
        v = metrics[k]
        text = f"{100 * v:.2f}" if k in PAPER_ORDER and isinstance(v, float) else str(v)
        rows.append((METRIC_NAMES.get(k, k), text))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric'.ljust(width)}  value (%)", f"{'-' * width}  ---------"]
    lines += [f"{name.ljust(width)}  {text}" for name, text in rows]
    return "\n".join(lines)


@dataclass
class Predictions:
    """Outputs of :func:`predict_dataset` (CPU, numpy): ``scores`` (N,) float32, ``labels`` (N,)
    int64, ``maps`` (N, H, W) float32 (None when only their ranges were kept), ``masks`` (N, H, W)
    bool or None, ``paths`` (N,), ``map_range`` (N, 2): each map's minimum and maximum;
    ``normal_top``: the largest values of the normal images' maps, descending, and
    ``normal_pixels``: how many pixels those maps hold (with ``normal_top_share``)."""

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray | None
    masks: np.ndarray | None
    paths: list[str]
    map_range: np.ndarray | None = None
    normal_top: np.ndarray | None = None
    normal_pixels: int = 0


def _split_item(batch):
    """(images, labels, masks or None, paths) from a collated batch of any of the library's test
    sets: (image, label, mask, path) (MVTec, VisA) or (image, label, path) (class folders)."""
    if not isinstance(batch, (list, tuple)) or len(batch) not in (3, 4):
        raise ValueError("test set items must be (image, label, mask, path) or (image, label, path), "
                         f"got {type(batch).__name__} of {len(batch) if isinstance(batch, (list, tuple)) else '?'}")
    images, labels = batch[0], batch[1]
    masks = batch[2] if len(batch) == 4 else None
    paths = list(batch[-1]) if isinstance(batch[-1], (list, tuple)) else [""] * len(images)
    return images, torch.as_tensor(labels), masks, paths


def predict_dataset(model, dataset: Dataset, batch_size: int = 16, device="cpu", progress: bool = True,
                    num_workers: int = 0, distributed: bool = False, precision=None,
                    keep_maps: bool | str = True, normal_top_share: float = 0.0) -> Predictions | None:
    """Score every item of ``dataset`` with ``model`` (moved to ``device``; put back in the
    training mode it had), a :class:`~ckaad_fast.model.Detector`'s forward in ``precision`` (None:
    its default, float32). Masks are resized (nearest) to the maps' size when they differ.
    A model with a tiling (its ``tiling`` attribute, a :class:`~ckaad_fast.tiling.Tiling`, and
    ``tiled(images, precision, batch=)``) gets each image at its own size (build the data
    set at ``config.source_size``) and scores ``batch_size`` of its tiles at a time; its maps,
    and so the pixel metrics, are at the images' full resolution.

    ``distributed=True`` (call it on every rank of a process group): each rank scores its
    contiguous shard of whole batches (:func:`ckaad_fast.distributed.shard` with ``block=batch_size``,
    so that its batches are those of one process and the outputs the same) and rank 0 gets the
    whole data set's predictions, in order; the other ranks get None.
    Without a process group of more than one process it is the single-process call.

    ``keep_maps``: True keeps every map; ``"masked"`` keeps them only for a set with masks (the
    pixel metrics need them) and otherwise only each map's range (``map_range``), so that memory
    does not grow with the images times their pixels (a calibration set of normal images).
    ``normal_top_share``: also keep the largest values of the normal images' maps, at least that
    share of all their pixels plus one (``normal_top``; a pixel false-positive rate's threshold
    needs no more), whatever ``keep_maps`` says. Not with ``distributed``."""
    if len(dataset) == 0:
        raise ValueError("the test set is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if distributed:
        from . import distributed as ddp

        if ddp.is_distributed():
            return _predict_sharded(ddp, model, dataset, batch_size, device, progress, num_workers, precision,
                                    keep_maps)
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    # The Scorer's layout rule: the same convolution algorithms, so the same scores.
    dtype = None if precision is None else resolve_precision(precision, device, int8=True)
    channels_last = channels_last_for(device, torch.float32 if dtype is None else dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # A tiled model takes each image whole, at its own size, and scores batch_size tiles at a time.
    tiled = getattr(model, "tiling", None) is not None
    loader = DataLoader(dataset, batch_size=1 if tiled else batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    scores, labels, maps, masks, paths = [], [], [], [], []
    has_masks = None
    top = _LargestNormal(normal_top_share, len(dataset))
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="scoring", disable=not progress, leave=False, dynamic_ncols=True):
                images, lab, mask, p = _split_item(batch)
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                out = _forward(model, images, dtype, tiled, batch_size, p)
                if out is None:
                    continue
                s, m = out
                m = m.float().cpu()
                has_masks = mask is not None if has_masks is None else has_masks
                keep = keep_maps is True or (keep_maps == "masked" and has_masks)
                scores.append(s.float().cpu())
                maps.append(m if keep else torch.stack([m.amin((1, 2)), m.amax((1, 2))], 1))
                top.add(m, lab.cpu())
                labels.append(lab.long().cpu())
                paths.extend(p)
                if has_masks:
                    masks.append(_mask_like(mask, m))
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError(f"no image of the set could be scored ({len(dataset)} left out: see the warnings)")
    pred = _predictions(scores, labels, maps, masks if has_masks else None, paths, kept=maps[0].dim() == 3)
    if top.values is not None:
        pred.normal_top, pred.normal_pixels = top.values.numpy(), top.pixels
    return pred


def _predict_sharded(ddp, model, dataset, batch_size, device, progress, num_workers, precision, keep_maps):
    """:func:`predict_dataset` of this rank's contiguous shard of whole batches, gathered on rank 0."""
    start, stop = ddp.shard_bounds(len(dataset), block=batch_size)
    part = None
    if stop > start:
        part = predict_dataset(model, Subset(dataset, range(start, stop)), batch_size=batch_size, device=device,
                               progress=progress and ddp.is_main(), num_workers=num_workers, precision=precision,
                               keep_maps=keep_maps)
    parts = ddp.gather_object(part)
    return None if parts is None else _concat([p for p in parts if p is not None])


class _LargestNormal:
    """The largest values of the normal images' maps: at least ``share`` of all the pixels of
    ``n_images`` maps of the first map's size, plus one (an upper bound on the normal ones: a set
    of one size, as a tiled calibration set is checked to be)."""

    def __init__(self, share: float, n_images: int):
        self.share, self.n_images = share, n_images
        self.k, self.values, self.pixels = 0, None, 0

    def add(self, maps: torch.Tensor, labels: torch.Tensor) -> None:
        if self.share <= 0:
            return
        if not self.k:
            self.k = int(np.ceil(self.share * self.n_images * maps[0].numel())) + 1
        normal = maps[labels == 0].reshape(-1)
        self.pixels += normal.numel()
        joined = normal if self.values is None else torch.cat([self.values, normal])
        self.values = torch.topk(joined, min(self.k, joined.numel())).values


def _predictions(scores, labels, maps, masks, paths, kept: bool) -> Predictions:
    if kept:
        _check_one_size(maps)
        full = torch.cat(maps)
        ranges = torch.stack([full.amin((1, 2)), full.amax((1, 2))], 1)
    else:
        full, ranges = None, torch.cat(maps)
    return Predictions(scores=torch.cat(scores).numpy(), labels=torch.cat(labels).numpy(),
                       maps=None if full is None else full.numpy(),
                       masks=torch.cat(masks).numpy() if masks else None, paths=paths, map_range=ranges.numpy())


def _forward(model, images, dtype, tiled: bool, batch_size: int, paths):
    """One batch's (scores, maps); None for a tiled model's image smaller than a tile (left out
    with a warning, as data sets leave out odd files; a tiled set's batches hold one image)."""
    if not tiled:
        return model(images) if dtype is None else model(images, dtype)
    tiling = model.tiling
    if not tiling.fits(*images.shape[-2:]):
        warn_skip(paths[0], tiling.too_small(*images.shape[-2:]))
        return None
    return model.tiled(images, torch.float32 if dtype is None else dtype, batch=batch_size)


def _mask_like(mask: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """A batch's masks as bools at its maps' size (nearest)."""
    mask = mask.float()
    if mask.dim() == 3:
        mask = mask[:, None]
    if tuple(mask.shape[-2:]) != tuple(maps.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(maps.shape[-2:]), mode="nearest")
    return mask[:, 0] > 0.5


def _check_one_size(maps: list[torch.Tensor]) -> None:
    sizes = sorted({tuple(m.shape[-2:]) for m in maps})
    if len(sizes) > 1:
        raise ValueError(f"the test set's images come in {len(sizes)} sizes ({sizes[0]} and {sizes[-1]} among them): "
                         "a tiled model's maps are at each image's own size, and the metrics need one size")


def _concat(parts: list[Predictions]) -> Predictions:
    """The predictions of consecutive shards, as one."""
    if len(parts) == 1:
        return parts[0]
    has_masks = all(p.masks is not None for p in parts)
    return Predictions(
        scores=np.concatenate([p.scores for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        maps=np.concatenate([p.maps for p in parts]) if all(p.maps is not None for p in parts) else None,
        masks=np.concatenate([p.masks for p in parts]) if has_masks else None,
        paths=[x for p in parts for x in p.paths],
        map_range=np.concatenate([p.map_range for p in parts]),
    )


def evaluate_model(model, dataset: Dataset, batch_size: int = 16, device="cpu", progress: bool = True,
                   num_workers: int = 0, distributed: bool = False, by_defect_type: bool = False,
                   precision=None) -> dict:
    """Image AUROC, best F1 and its accuracy, and, where the data set has masks with anomalous
    pixels, pixel AUROC, AUPRO (standard) and AUPRO (reference per-image protocol), plus
    ``num_images`` and ``num_anomalous``. See :func:`ckaad_fast.metrics.evaluate`. ``precision``:
    the model's forward's (see :func:`predict_dataset`; the execution plan's choice for a
    checkpoint as deployed: :func:`ckaad_fast.runtime.planned.evaluate_planned`).

    ``distributed=True``: call it on every rank of a process group (e.g. under torchrun); the
    data set is sharded over the ranks (see :func:`predict_dataset`), the metrics are computed on
    rank 0 and every rank returns them (an error there is raised on every rank).

    ``by_defect_type=True`` adds ``by_defect_type``: for each anomaly type of the data set (MVTec's
    test sub-folders, VisA's ``image_anno.csv`` labels, the classes of class-labelled sets; see :func:`defect_types_of`) the same
    metrics on its images and the normal ones: which defects the model finds, the paper's question
    (the coarse anomalies' type is seen in training, the others are not)."""
    types = defect_types_of(dataset) if by_defect_type else None
    if distributed:
        from . import distributed as ddp

        if ddp.is_distributed():
            pred = predict_dataset(model, dataset, batch_size=batch_size, device=device, progress=progress,
                                   num_workers=num_workers, distributed=True, precision=precision)
            return ddp.run_on_main(lambda: metrics_from_predictions(pred, types))
    pred = predict_dataset(model, dataset, batch_size=batch_size, device=device, progress=progress,
                           num_workers=num_workers, precision=precision)
    return metrics_from_predictions(pred, types)


def defect_types_of(dataset) -> list[str] | None:
    """Each item's defect type, "good" for normal ones: MVTec's ``defect_types``, or the
    ``classes`` of a class-labelled set (its normal class as "good"); None where the data set
    does not say (VisA without its ``image_anno.csv``)."""
    if getattr(dataset, "defect_types", None) is not None:
        return list(dataset.defect_types)
    classes, normal = getattr(dataset, "classes", None), getattr(dataset, "normal_class", None)
    if classes is not None and normal is not None:
        return ["good" if c == normal else c for c in classes]
    return None


def metrics_from_predictions(pred: Predictions, types: list[str] | None = None) -> dict:
    """The metrics of :func:`evaluate_model` from predictions already made; with ``types`` (each
    item's defect type, "good" for normal ones: :func:`defect_types_of`) also ``by_defect_type``."""
    out = _flat_metrics(pred)
    if types is not None:
        kinds = np.asarray(types)
        out["by_defect_type"] = {
            t: _flat_metrics(_subset(pred, (kinds == "good") | (kinds == t)))
            for t in dict.fromkeys(x for x in types if x != "good")
        }
    return out


def _subset(pred: Predictions, keep: np.ndarray) -> Predictions:
    idx = np.flatnonzero(keep)
    return Predictions(pred.scores[idx], pred.labels[idx], pred.maps[idx],
                       None if pred.masks is None else pred.masks[idx], [pred.paths[i] for i in idx])


def _flat_metrics(pred: Predictions) -> dict:
    labels = pred.labels
    if len(np.unique(labels)) < 2:
        raise ValueError("the test set must hold both normal and anomalous images to compute AUROC, "
                         f"got only label {int(labels[0])}")
    masks = pred.masks
    if masks is not None and not masks.any():
        masks = None  # no anomalous pixel anywhere: image metrics only
    metrics = evaluate(labels, pred.scores, masks, pred.maps if masks is not None else None)
    out = {k: float(v) for k, v in metrics.items()}
    out["num_images"] = int(len(labels))
    out["num_anomalous"] = int(labels.sum())
    return out
