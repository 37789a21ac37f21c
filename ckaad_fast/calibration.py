"""From a raw score to a decision: thresholds calibrated on data that is not the test set.

:func:`calibrate` scores a calibration set with a trained detector and picks the image threshold:

- with anomalous images in the set, the one that maximises F1 (:func:`ckaad_fast.metrics.image_f1_acc`,
  sklearn's rule), and a pixel threshold the same way where the set has masks;
- with normal images only, the one at a chosen false-positive rate: the lowest threshold at which
  at most ``target_fpr`` of the normal scores are at or above it (the empirical quantile). A set
  too small for that rate (fewer than ``1 / target_fpr`` images) is refused.

Before trusting a set, it checks that the images it calls normal look normal: scores above Tukey's
far-out fence of the set's own normal scores (third quartile + 3 interquartile ranges), or, in a
set with improbably many high scores, above a robust fit's 95% line (see
:mod:`ckaad_fast.calibration_checks`) are counted as *suspected anomalies*, recorded with the threshold
the set would give without them, and, when they set the threshold (it lies above the fence and
differs from the one without them), named in a :class:`CalibrationSetWarning`. The threshold
is still picked on the whole set (the images may be normal after all); the warning says how far
it moved. Anomalies that score like normal images pass unseen (and move a threshold little).

It also records the minimum and maximum of the image scores and of the maps, for anomalib's
normalised score ``clip((s - t) / (max - min) + 0.5, 0, 1)`` (:func:`ckaad_fast.head.normalized_score`):
the threshold maps to 0.5 and the score stays monotone in the raw one. Decisions compare the raw
float32 score with a float32 threshold (:func:`ckaad_fast.head.decision_threshold`), the same
comparison in Python, numpy and an exported graph.

The calibration records the precision its scores were computed in (``precision``, float32 by
default: the same scores on every CPU and GPU up to float32 rounding), the kind of device and the
engine that ran the forward (:mod:`ckaad_fast.runtime`; ``auto`` by default: the fastest here). A
:class:`~ckaad_fast.scoring.Scorer` of the checkpoint scores in that precision, with that engine,
unless told otherwise, so that the images of the calibration set get exactly the decisions it
promised.
:func:`write_calibration` stores the result in a checkpoint (a ``calibration`` entry; checkpoints
without one load as before), where :class:`ckaad_fast.scoring.Scorer` and ``ckaad-fast score``
find it.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset

from .atomic import atomic_torch_save
from .calibration_checks import FENCE_IQRS, fence_rule, suspected_anomalies
from .data.files import check_one_size
from .errors import ArgumentError
from .evaluation import predict_dataset
from .head import DEFAULT_SENSITIVITY, decision_threshold, float32_at_least, normalized_score
from .metrics import image_f1_acc
from .model import PlainConfig, checkpoint_file, fingerprint, load_checkpoint
from .precision import canonical_precision, precision_name, resolve_precision
from .runtime import ENGINES, RUNTIME_ENGINES, RuntimeModule, build_runtime_engine, resolve_engine
from .runtime.quantize import DEFAULT_MAX_AUROC_DROP, DEFAULT_SCOPE, QuantizedGraph, check_resolves, quantize_graph

__all__ = ["Calibration", "calibrate", "calibration_from_scores", "normal_folder_set", "write_calibration",
           "read_calibration", "split_for_calibration", "threshold_at_fpr", "check_calibration_split",
           "check_calibration_out", "check_set_size", "suspected_anomalies", "CalibrationSetWarning", "FENCE_IQRS"]

METHODS = ("f1", "fpr")


class CalibrationSetWarning(UserWarning):
    """A calibration set's images labelled normal include some that score like anomalies."""


@dataclass
class Calibration(PlainConfig):
    """Thresholds and normalisation statistics picked on a calibration set (see the module)."""

    _kind = "calibration"

    image_threshold: float
    score_min: float
    score_max: float
    method: str  # "f1" (anomalies present) or "fpr" (normal images only)
    target_fpr: float | None = None
    pixel_threshold: float | None = None
    map_min: float | None = None
    map_max: float | None = None
    num_normal: int = 0
    num_anomalous: int = 0
    #: The precision the calibration set was scored in (None: a calibration older than this
    #: record, which was float32).
    precision: str | None = None
    #: The kind of device it was scored on ("cpu" or "cuda"; None: not recorded): on a GPU,
    #: float32 convolutions run in TF32 by PyTorch's default, which moves scores by about 1e-4.
    device: str | None = None
    #: How many images labelled normal scored above the set's far-out fence (see the module), and
    #: the image threshold the set gives without them (None: none suspected, or too few left).
    suspected_anomalies: int = 0
    threshold_without_suspected: float | None = None
    #: True when the set was the model's own training images, by explicit override: their scores
    #: are lower than fresh images', so the threshold flags more than its target on new data.
    on_training_images: bool = False
    #: The engine that scored the set (:mod:`ckaad_fast.runtime.engines`; None: a calibration
    #: older than this record, which was torch's). A Scorer follows it, as it follows precision.
    engine: str | None = None
    #: For precision "int8": what was quantized and how, and what it cost on the check set
    #: (:func:`ckaad_fast.runtime.quantize.quantize_graph`'s report). The quantized graph itself
    #: travels as the attribute ``int8_graph`` and is stored beside the calibration.
    quantization: dict | None = None

    def __post_init__(self):
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"calibration device must be 'cpu', 'cuda' or None, got {self.device!r}")
        if self.precision is not None:
            self.precision = canonical_precision(self.precision, "precision", int8=True)
            if self.precision == "auto":
                raise ValueError("calibration precision must be a resolved one (float32, bfloat16, float16), not auto")
        if self.engine not in (None, *ENGINES[1:]):
            raise ValueError(f"calibration engine must be one of {ENGINES[1:]} or None, got {self.engine!r}")
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        for name in ("image_threshold", "score_min", "score_max"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"calibration {name} must be finite, got {getattr(self, name)!r}")
        if not float(self.score_max) > float(self.score_min):
            # Every normalised score would saturate at 0 or 1: the range carries no information.
            raise ValueError(f"calibration score_max ({self.score_max!r}) must exceed score_min ({self.score_min!r})")

    def normalize(self, scores):
        """anomalib's normalised score: ``clip((s - t) / (max - min) + 0.5, 0, 1)``; t -> 0.5."""
        out = normalized_score(scores, self.image_threshold, self.score_min, self.score_max)
        return float(out) if out.ndim == 0 else out

    def decision_threshold(self, sensitivity: float = DEFAULT_SENSITIVITY) -> float:
        """The float32 raw score at or above which an image is anomalous at ``sensitivity``."""
        return decision_threshold(self.image_threshold, self.score_min, self.score_max, sensitivity)

    def normalize_map(self, amap):
        """A map on the same scale: ``clip((m - t) / (map_max - map_min) + 0.5, 0, 1)`` with the pixel
        threshold (the image threshold where the calibration set had no masks); t -> 0.5."""
        t = self.pixel_threshold if self.pixel_threshold is not None else self.image_threshold
        lo = self.map_min if self.map_min is not None else self.score_min
        hi = self.map_max if self.map_max is not None else self.score_max
        return normalized_score(np.asarray(amap, dtype=np.float32), t, lo, hi).astype(np.float32)

    def is_anomalous(self, score: float, sensitivity: float = DEFAULT_SENSITIVITY) -> bool:
        """The decision at ``sensitivity`` (0-1; 0.5 is the calibrated threshold, higher flags
        more): the score at or above :meth:`decision_threshold` (where the normalised score
        reaches ``1 - sensitivity``)."""
        return bool(score >= self.decision_threshold(sensitivity))

    def describe(self) -> str:
        how = (f"best F1 on {self.num_normal} normal and {self.num_anomalous} anomalous images"
               if self.method == "f1" else
               f"false-positive rate {100 * self.target_fpr:g}% on {self.num_normal} normal images")
        pixel = f", pixel threshold {self.pixel_threshold:.6g}" if self.pixel_threshold is not None else ""
        where = (f" on {self.device}" if self.device else "") + (f" by {self.engine}" if self.engine else "")
        text = (f"image threshold {self.image_threshold:.6g} ({how}){pixel}; scores on that set "
                f"{self.score_min:.6g} .. {self.score_max:.6g}, computed in {self.precision or 'float32'}{where}")
        q = self.quantization
        if q:
            cost = (f"AUROC {q['auroc_float32']:.4f} -> {q['auroc_int8']:.4f} on the {q['measured_on']}, "
                    if q.get("auroc_drop") is not None else "")
            text += (f"; int8 ({q['method']}, {q['scope']} quantized): {cost}scores moved by up to "
                     f"{100 * q['relative_score_change']['max']:.2g}%")
        if self.suspected_anomalies:
            moved = (f" (without them: {self.threshold_without_suspected:.6g})"
                     if self.threshold_without_suspected is not None else "")
            text += f"; {self.suspected_anomalies} images labelled normal scored like anomalies{moved}"
        if self.on_training_images:
            text += ("; picked on the model's training images (explicit override): expect more false positives "
                     "than the target on new images")
        return text


def threshold_at_fpr(normal_scores, target_fpr: float) -> float:
    """The lowest float32 threshold at which at most ``target_fpr`` of ``normal_scores`` are >= it.

    Scores are float32 on every path, so the threshold is a float32 number too (the next one
    above the (k+1)-th largest score): exact in every precision it is compared in."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    n = s.size
    k = int(math.floor(target_fpr * n + 1e-9))  # how many normal images may be flagged
    # Everything strictly above the (k+1)-th largest score: ties never push the rate above target.
    return float32_at_least(float(np.nextafter(s[n - 1 - k], np.inf)))


def calibration_from_scores(labels, scores, target_fpr: float = 0.01, masks=None, maps=None,
                            precision: str | None = "float32", device: str | None = None,
                            paths=None, on_training_images: bool = False, engine: str | None = None,
                            map_range=None) -> Calibration:
    """A :class:`Calibration` from a calibration set's labels and image scores (and, optionally,
    its masks and maps), computed in ``precision``. Images labelled normal that score like
    anomalies are counted, recorded and named (``paths``) in a :class:`CalibrationSetWarning`
    (see the module). Errors are :class:`~ckaad_fast.errors.ArgumentError` naming the argument."""
    cal = _calibration(labels, scores, target_fpr, masks, maps, precision, device, map_range)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    cal.on_training_images = bool(on_training_images)
    cal.engine = engine
    normal = np.flatnonzero(labels == 0)
    suspect, fence = suspected_anomalies(scores[normal])
    if suspect.any():
        cal.suspected_anomalies = int(suspect.sum())
        keep = np.ones(scores.size, dtype=bool)
        keep[normal[suspect]] = False
        try:
            cal.threshold_without_suspected = _calibration(
                labels[keep], scores[keep], target_fpr, None if masks is None else np.asarray(masks)[keep],
                None if maps is None else np.asarray(maps)[keep], precision, device,
                None if map_range is None else np.asarray(map_range)[keep]).image_threshold
        except ArgumentError:  # too few left for the rate, or all alike: say so without a number
            cal.threshold_without_suspected = None
    if suspect.any() and cal.image_threshold > fence and cal.threshold_without_suspected != cal.image_threshold:
        # Only when the suspects set the threshold: above the fence (below it they are images the
        # rate allows to flag), and not the one without them (F1 may pick it either way).
        named = [os.fspath(paths[i]) for i in normal[suspect][:3]] if paths is not None else []
        moved = (f"; without them it would be {cal.threshold_without_suspected:.6g}"
                 if cal.threshold_without_suspected is not None else "")
        warnings.warn(
            f"{cal.suspected_anomalies} of {normal.size} calibration images labelled normal score above "
            f"{fence:.6g} ({fence_rule(scores[normal])}), as defects do"
            + (f", e.g. {', '.join(named)}" if named else "")
            + f". The threshold {cal.image_threshold:.6g} was picked with them{moved}. If they are defects, take "
              "them out of the normal set and calibrate again; if they are normal, the threshold stands.",
            CalibrationSetWarning, stacklevel=2)
    return cal


def _calibration(labels, scores, target_fpr, masks, maps, precision, device, map_range=None) -> Calibration:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ArgumentError("data", "the calibration set is empty")
    if labels.size != scores.size:
        raise ArgumentError("data", f"{labels.size} labels for {scores.size} scores")
    if not np.isfinite(scores).all():
        raise ArgumentError("data", f"{int((~np.isfinite(scores)).sum())} calibration images have no finite score")
    if not (isinstance(target_fpr, (int, float)) and 0 < target_fpr < 1):
        raise ArgumentError("target_fpr", f"must lie in (0, 1), got {target_fpr!r}")
    n_normal, n_anom = int((labels == 0).sum()), int((labels == 1).sum())
    if n_normal == 0:
        raise ArgumentError("data", "the calibration set holds no normal image")
    if scores.max() == scores.min():
        raise ArgumentError("data", f"every one of the {scores.size} calibration images got the same score "
                                    f"({scores[0]:.6g}): the model cannot tell them apart, so no threshold picked on "
                                    "them means anything (is it trained? are the images all alike?)")
    cal = dict(score_min=float(scores.min()), score_max=float(scores.max()), num_normal=n_normal,
               num_anomalous=n_anom, precision=precision, device=device)
    if maps is not None:
        maps = np.asarray(maps)
        cal.update(map_min=float(maps.min()), map_max=float(maps.max()))
    elif map_range is not None:  # each map's (min, max): what a set without masks keeps
        cal.update(map_min=float(np.min(map_range)), map_max=float(np.max(map_range)))
    if n_anom:
        cal.update(method="f1", image_threshold=image_f1_acc(labels, scores)[2])
        if masks is not None and maps is not None and np.asarray(masks).any():
            cal["pixel_threshold"] = image_f1_acc(np.asarray(masks).reshape(-1) > 0, maps.reshape(-1))[2]
    else:
        check_set_size(n_normal, 0, target_fpr)
        cal.update(method="fpr", target_fpr=float(target_fpr),
                   image_threshold=threshold_at_fpr(scores[labels == 0], target_fpr))
    return Calibration(**cal)


def calibrate(model, dataset, target_fpr: float = 0.01, batch_size: int = 16, device="cpu",
              progress: bool = False, precision: str = "float32", on_training_images: bool = False,
              engine: str = "auto", check=None, max_auroc_drop: float = DEFAULT_MAX_AUROC_DROP,
              int8_scope: str = DEFAULT_SCOPE) -> Calibration:
    """Score ``dataset`` (items ``(image, label, [mask,] path)``, never the test set) with ``model``
    in ``precision`` (float32 by default; see the module) by ``engine`` (:mod:`ckaad_fast.runtime`;
    "auto": the fastest here, which a Scorer of the calibrated checkpoint then uses too) and pick
    its :class:`Calibration`. ``on_training_images=True`` records that the set is the model's own
    training images (an explicit override; see :func:`check_calibration_split`).

    ``precision="int8"`` first quantizes the model's graph (:mod:`ckaad_fast.runtime.quantize`;
    ``int8_scope``) on the set's normal images, with accuracy control on ``check`` (a data set of
    normal and anomalous images held out from training; None: the calibration set itself when it
    holds both) within ``max_auroc_drop``, then picks the threshold on the quantized graph's
    scores: the calibration carries the graph (``int8_graph``) and its report (``quantization``)."""
    if isinstance(dataset, _AsNormal):  # all normal: too small a set is refused before any scoring
        check_set_size(len(dataset), 0, target_fpr)
    device = torch.device(device)
    dtype = resolve_precision(precision, device, "precision", int8=True)
    name = resolve_engine(engine, device, dtype)
    if getattr(model.config, "tiling", None) is not None:  # refused before anything is scored
        if dtype == torch.int8:
            raise ArgumentError("precision", "int8 is not available for a tiled model yet (its quantized graph "
                                             "would score tiles, not the stitched image): calibrate in float32")
        check_one_size(getattr(dataset, "paths", None) or getattr(getattr(dataset, "dataset", None), "paths", None),
                       "the calibration set", "a tiled model's pixel threshold is picked over maps of one size")
    scorer, graph = model, None
    if dtype == torch.int8:
        graph = _quantized(model, dataset, check, max_auroc_drop, int8_scope)
    if name in RUNTIME_ENGINES:
        runtime = build_runtime_engine(name, model, fingerprint(model), model.config.topk, dtype, quantized=graph)
        scorer, dtype = RuntimeModule(runtime, model.config), runtime.dtype
    # Maps only where masks ask for them: a set of normal images keeps each map's range alone.
    pred = predict_dataset(scorer, dataset, batch_size=batch_size, device=device, progress=progress, precision=dtype,
                           keep_maps="masked")
    cal = calibration_from_scores(pred.labels, pred.scores, target_fpr, masks=pred.masks, maps=pred.maps,
                                  map_range=pred.map_range,
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


def check_calibration_split(split: str, layout: str, allow_training_images: bool = False) -> None:
    """Refuse, before anything is scored, a split a threshold must never come from: the test
    split (the numbers it is judged by) and the training split (images the model has learnt:
    their scores are lower than fresh ones', so a 5% target flagged 33% of fresh normal images in
    one run) unless ``allow_training_images`` (an explicit override, recorded in the
    calibration), and say what to do instead. The layouts hold only those two splits."""
    hint = ("hold normal images out of training and pass --normal DIR, or train with --calibrate, which holds "
            "them out for you")
    if split == "test":
        raise ArgumentError("split", f"never calibrate on the test split: {hint}")
    if split == "train":
        if allow_training_images:
            return
        raise ArgumentError("split", f"the training split holds the images the model learnt from, whose scores "
                                     f"are lower than fresh ones' (the threshold would flag far more than its "
                                     f"target): {hint} (or, knowing this, --allow-training-images, which the "
                                     f"calibration records)")
    raise ArgumentError("split", f"layout {layout!r} has no {split!r} split (only train and test): {hint}")


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


def normal_images_needed(target_fpr: float) -> int:
    """How many normal images a normal-only set needs for ``target_fpr``: 1 / rate."""
    return int(math.ceil(1.0 / target_fpr - 1e-9))


def check_set_size(n_normal: int, n_anomalous: int, target_fpr: float) -> None:
    """Refuse, before anything is scored, a normal-only set too small for ``target_fpr``."""
    need = normal_images_needed(target_fpr)
    if n_anomalous == 0 and n_normal < need:
        raise ArgumentError("data", f"a {100 * target_fpr:g}% false-positive rate needs at least {need} normal "
                                    f"images to calibrate on, got {n_normal}")


class _AsNormal:
    """The items of an image folder as normal ones: ``(image, 0, path)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, _, path = self.dataset[i]
        return image, 0, path


def normal_folder_set(folder, image_size, mean, std):
    """A calibration set of the images in ``folder`` (searched recursively), all normal: the
    good parts a production line holds aside to set its false-positive rate."""
    from .data import AnomalyFolderDataset

    try:
        return _AsNormal(AnomalyFolderDataset(folder, image_size, mean, std))
    except ValueError as e:
        raise ArgumentError("normal", str(e)) from None


class _Part(Subset):
    """Some items of a data set, keeping the attributes training reads (normalisation, paths)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        for name in ("mean", "std", "image_size"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))
        if hasattr(dataset, "paths"):
            self.paths = [dataset.paths[i] for i in self.indices]


class _Labelled:
    """``(image, label, path)`` items of any of the library's data sets, all with one label."""

    def __init__(self, dataset, label: int):
        self.dataset, self.label = dataset, label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item[0], self.label, item[-1] if isinstance(item[-1], str) else ""


def split_for_calibration(train_set, anomaly_set=None, share: float = 0.1, seed: int = 0,
                          target_fpr: float = 0.01):
    """Hold out ``share`` of the normal training images (and of the coarse anomalies, when there
    are any) for calibration, drawn with ``seed``: ``(train_set, anomaly_set, calibration_set)``,
    the first two to train on, the last never seen in training (its items ``(image, label, path)``).
    A held-out set that could not be calibrated on (normal images only, fewer than
    ``1 / target_fpr``) is refused here, before any training."""
    if not (isinstance(share, (int, float)) and 0 < share < 1):
        raise ArgumentError("calibrate_share", f"must lie in (0, 1), got {share!r}")
    rng = np.random.default_rng(seed)

    def split(ds):
        n = len(ds)
        k = max(1, int(round(share * n)))  # at least one image of each kind to calibrate on
        if k >= n:
            raise ArgumentError("calibrate_share", f"{share:g} of {n} images leaves nothing to train on or to "
                                                   f"calibrate with")
        held = set(rng.permutation(n)[:k].tolist())
        return _Part(ds, [i for i in range(n) if i not in held]), _Part(ds, sorted(held))

    train_kept, normal_held = split(train_set)
    parts = [_Labelled(normal_held, 0)]
    anomalies_kept = anomaly_set
    if anomaly_set is not None and len(anomaly_set) > 1:
        anomalies_kept, anomalies_held = split(anomaly_set)
        parts.append(_Labelled(anomalies_held, 1))
    need = normal_images_needed(target_fpr)
    if len(parts) == 1 and len(normal_held) < need:
        raise ArgumentError("calibrate_share", f"holds out {len(normal_held)} normal images and no anomalies; a "
                                               f"{100 * target_fpr:g}% false-positive rate needs at least {need}: "
                                               "raise the share or the rate, or give labelled anomalies")
    return train_kept, anomalies_kept, ConcatDataset(parts)


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
