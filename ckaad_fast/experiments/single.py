"""One run of an experiment: its data by the paper's protocol, its training, its numbers.

Class-labelled data: the validation split (:func:`ckaad_fast.data.carve_validation`) comes off
the training split first; the labelled anomalies are drawn from the rest
(:func:`ckaad_fast.data.sample_coarse_anomalies`, the run's classes and seed). F1 and ACC are
reported two ways: ``image_f1`` / ``image_acc`` at the test set's own best-F1 threshold (what the
authors' code reports, the paper's numbers) and ``image_f1_val`` / ``image_acc_val`` at the
threshold of best F1 on the validation split (a decision fixed before the test set is seen).

Industrial data: the whole training split trains (no validation split, as in the paper), with
the elastic pseudo-anomalies or the experiment's ``anomaly_dir``; the test metrics include pixel
AUROC and both AUPRO definitions.

A run whose folder already holds a checkpoint continues it (:func:`ckaad_fast.training.train`
with ``resume=True``), so a run cut short by a crash loses at most its current epoch.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..data import AnomalyFolderDataset, open_dataset, sample_coarse_anomalies
from ..evaluation import defect_types_of, metrics_from_predictions, predict_dataset
from ..metrics import f1_acc_at, image_f1_acc
from ..model import CHECKPOINT_NAME
from ..pipeline import fit
from ..training import resolve_config
from .plan import Experiment, RunSpec

__all__ = ["run_one", "run_config"]


def run_config(exp: Experiment, spec: RunSpec):
    """The TrainConfig of one run: the layout's and category's defaults, the experiment's
    settings, the run's strategy and seed, the experiment's protocol."""
    given = {**exp.settings, "strategy": spec.strategy, "seed": spec.seed, "protocol": exp.protocol,
             "eval_every": 0, "evaluate": False}
    return resolve_config(given, layout=exp.layout, category=spec.category)


def _open(exp: Experiment, spec: RunSpec, split: str, cfg, cache: dict | None):
    """The split, indexed once per experiment: every run of a category reads the same files
    (the protocol's splits are copies of it, never changes to it)."""
    mean, std = cfg.normalization()
    key = (split, spec.category, cfg.source_size, mean, std)
    if cache is not None and key in cache:
        return cache[key]
    ds = open_dataset(exp.layout, exp.root, split, cfg.source_size, mean, std, category=spec.category,
                      normal_class=exp.normal_class,
                      mask_resize="bilinear" if exp.protocol == "reference" else "nearest")
    if cache is not None:
        cache[key] = ds
    return ds


def _anomalies(exp: Experiment, spec: RunSpec, cfg):
    """The run's coarse anomaly set: a dataset, or (class-labelled data) how to draw it from the
    training split left after the validation carve-out; None without one."""
    mean, std = cfg.normalization()
    if exp.class_labelled:
        if not (cfg.uses_anomalies and spec.ratio_labeled > 0):
            return None

        def draw(train_set):
            coarse = sample_coarse_anomalies(train_set, spec.ratio_labeled, classes=spec.anomaly_classes,
                                             seed=spec.seed)
            return AnomalyFolderDataset(coarse, cfg.source_size, mean, std)
        return draw
    if exp.anomaly_dir and cfg.uses_anomalies:
        folder = exp.anomaly_dir.replace("{category}", spec.category or "")
        return AnomalyFolderDataset(folder, cfg.source_size, mean, std)
    return None


def run_one(exp: Experiment, spec: RunSpec, out_dir: str | Path, progress: bool = True,
            datasets: dict | None = None) -> dict:
    """Train and evaluate one run into ``out_dir`` (its checkpoint and log); its result row:
    the run's fields, the metrics (``by_defect_type`` among them), the data's sizes, seconds.
    ``datasets``: a dict kept across the runs of an experiment, so each split is indexed once."""
    out = Path(out_dir)
    cfg = run_config(exp, spec)
    t0 = time.perf_counter()
    test_set = _open(exp, spec, "test", cfg, datasets)
    resume = (out / CHECKPOINT_NAME).is_file()
    fitted = fit(cfg, _open(exp, spec, "train", cfg, datasets), out, _anomalies(exp, spec, cfg),
                 validation=exp.class_labelled, resume=resume, progress=progress)
    result, train_set, anomalies, valid_set = fitted.result, fitted.train_set, fitted.anomaly_set, fitted.validation_set
    t1 = time.perf_counter()
    pred = predict_dataset(result.model, test_set, batch_size=cfg.batch_size, device=cfg.device, progress=False)
    metrics = metrics_from_predictions(pred, defect_types_of(test_set))
    if valid_set is not None:
        val = predict_dataset(result.model, valid_set, batch_size=cfg.batch_size, device=cfg.device, progress=False)
        threshold = image_f1_acc(val.labels, val.scores)[2]
        metrics["image_f1_val"], metrics["image_acc_val"] = f1_acc_at(pred.labels, pred.scores, threshold)
        metrics["val_threshold"] = threshold
    return {
        "run_id": spec.run_id, "category": spec.category, "strategy": spec.strategy,
        "ratio_labeled": spec.ratio_labeled, "anomaly_classes": list(spec.anomaly_classes), "draw": spec.draw,
        "seed": spec.seed, "protocol": exp.protocol, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "backbone": cfg.backbone, "image_size": list(cfg.image_size),
        "num_train": len(train_set), "num_labelled_anomalies": 0 if anomalies is None else len(anomalies),
        "num_validation": 0 if valid_set is None else len(valid_set),
        "train_seconds": round(t1 - t0, 2), "eval_seconds": round(time.perf_counter() - t1, 2),
        **metrics,
    }
