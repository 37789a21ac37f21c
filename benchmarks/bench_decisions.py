"""Which precision should a calibration and the scoring that trusts it share, and what does each cost?

A production line calibrates a threshold once (``ckaad-fast calibrate``) and scores behind it.
This script trains a small detector on a synthetic texture set (the demo's recipe), calibrates it
on held-out normal images at a 5% false-positive rate in float32 and in bfloat16, and scores the
calibration set and a fresh set (normal and defective images) in both precisions:

- ``flagged on calibration set``: how many of its images each scoring flags, against the
  calibration's promise (floor(rate * n));
- ``decisions moved``: fresh images decided differently from scoring in the calibration's own
  precision (what a line gets when scoring runs in another precision than it calibrated in);
- ``max rel. score diff``: against float32 scores of the same images;
- ``images/s``: the Scorer's throughput in that precision on this machine.

    python -m benchmarks.bench_decisions            # about 3 min on 2 CPU cores
    python -m benchmarks.bench_decisions --quick    # a tiny run for CI

Rows are appended to benchmarks/results/decisions.csv with the machine (CPU model and flags: a
bfloat16 row only means something next to whether the CPU multiplies bfloat16 in hardware).
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_name, print_table, save_rows

from ckaad_fast.calibration import calibrate, normal_folder_set, write_calibration
from ckaad_fast.data import MVTecDataset, list_images
from ckaad_fast.data.synthetic import make_texture_dataset
from ckaad_fast.model import load_checkpoint, model_from_checkpoint
from ckaad_fast.pipeline import fit
from ckaad_fast.precision import cpu_has_bf16_matmul
from ckaad_fast.scoring import Scorer
from ckaad_fast.training import resolve_config

PRECISIONS = ("float32", "bfloat16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny data and one epoch (for CI)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    p.add_argument("--image-size", type=int, default=128, help="image size in pixels (default: 128)")
    p.add_argument("--n-calibration", type=int, default=80, help="held-out normal images to calibrate on (default: 80)")
    p.add_argument("--target-fpr", type=float, default=0.05, help="false-positive rate calibrated at (default: 0.05)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch, calibrating and scoring (default: 16)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/decisions.csv")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.image_size, args.n_calibration, args.target_fpr = 1, 64, 20, 0.1
    return args


def _train(root: Path, out: Path, args):
    cfg = resolve_config({"strategy": "cka_patch", "backbone": "efficientnet_lite0",
                          "weights": "none" if args.quick else "imagenet", "image_size": args.image_size,
                          "epochs": args.epochs, "batch_size": 8, "eval_every": 0, "topk": 100}, layout="mvtec")
    mean, std = cfg.normalization()
    train_set = MVTecDataset(root, "brick", "train", args.image_size, mean, std)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights in --quick
        return fit(cfg, train_set, out, progress=False, overwrite=True).checkpoint


def _score(ckpt, precision: str, paths, batch_size: int):
    """(float32 scores, seconds) of the Scorer in ``precision`` (its calibration read, not used)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scoring in another precision than the calibration's is the point
        scorer = Scorer.from_checkpoint(ckpt, dtype=precision, batch_size=batch_size, num_workers=0)
        list(scorer.score_paths(paths[:batch_size], return_maps=False))  # warm-up
        t0 = time.perf_counter()
        res = list(scorer.score_paths(paths, return_maps=False))
    return np.array([r.score for r in res], dtype=np.float32), time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_cal = args.n_calibration
        root = make_texture_dataset(tmp / "data", "brick", n_train=40 if not args.quick else 10,
                                    n_test_good=n_cal + 20, n_test_defect=5, n_coarse=4,
                                    image_size=args.image_size, seed=0)
        ckpt = _train(root, tmp / "run", args)
        good = list_images(root / "brick" / "test" / "good")
        cal_dir = tmp / "calibration"
        cal_dir.mkdir()
        for p in good[:n_cal]:  # the calibration set: held-out normal images
            (cal_dir / Path(p).name).symlink_to(p)
        cal_paths = list_images(cal_dir)
        fresh = [p for p in list_images(root / "brick" / "test") if p not in good[:n_cal]]
        model = model_from_checkpoint(ckpt)
        cfg = model.config
        cal_set = normal_folder_set(cal_dir, cfg.image_size, cfg.mean, cfg.std)
        scores = {p: _score(ckpt, p, cal_paths + fresh, args.batch_size) for p in PRECISIONS}
        base = scores["float32"][0]
        rows = []
        for cal_p in PRECISIONS:
            cal = calibrate(model_from_checkpoint(ckpt), cal_set, target_fpr=args.target_fpr,
                            batch_size=args.batch_size, precision=cal_p)
            write_calibration(ckpt, cal)
            assert load_checkpoint(ckpt)["calibration"]["precision"] == cal_p
            t32 = np.float32(cal.decision_threshold())
            own = scores[cal_p][0] >= t32
            for score_p in PRECISIONS:
                s, seconds = scores[score_p]
                flags = s >= t32
                rows.append({
                    "calibrated in": cal_p, "scored in": score_p,
                    "flagged on calibration set": f"{int(flags[:n_cal].sum())} of {n_cal} "
                                                  f"(promised {math.floor(args.target_fpr * n_cal + 1e-9)})",
                    "decisions moved (fresh set)": f"{int((flags[n_cal:] != own[n_cal:]).sum())} of {len(fresh)}",
                    "max rel. score diff": f"{float(np.max(np.abs(s - base) / np.abs(base))):.2e}",
                    "images/s": f"{len(s) / seconds:.1f}",
                })
    units = "yes" if cpu_has_bf16_matmul() else "no (emulated)"
    print_table(f"decisions behind a {args.target_fpr:g}-FPR threshold; {machine_name()}; bfloat16 matrix units: {units}",
                list(rows[0]), [list(r.values()) for r in rows])
    save_rows("decisions", rows, args)
    return rows


if __name__ == "__main__":
    main()
