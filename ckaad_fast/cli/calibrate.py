"""``ckaad-fast calibrate``: pick a trained detector's decision threshold on data that is not the
test set, and store it in the checkpoint (a thin layer over :mod:`ckaad_fast.calibration`)."""
from __future__ import annotations

import argparse

from ..calibration import CALIBRATION_SPLIT, TARGET_FPR
from ..runtime.plan import ENGINES, default_of
from ..runtime.quantize import DEFAULT_MAX_AUROC_DROP, DEFAULT_SCOPE, SCOPES
from . import COMMANDS
from ._data import add_data_arguments, dataset_from_args
from ._types import add_tiling_arguments, fraction, fraction_or_zero, given, nonneg_int, positive_int, precision_or_int8


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate",
        help=COMMANDS["calibrate"],
        description="Score a calibration set that is not the test set and store the decision in the checkpoint: "
                    "with anomalous images in it, the threshold of best F1 (and a pixel threshold where masks "
                    "exist); with normal images only (--normal DIR, or a split with no anomalies), the threshold "
                    "at --target-fpr false positives. ckaad-fast score then writes normalized_score (0.5 at the "
                    "threshold) and is_anomalous.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint written by ckaad-fast train (or its output folder)")
    p.add_argument("--normal", metavar="DIR",
                   help="a folder of normal images held out from training (searched recursively): calibrate at "
                        "--target-fpr; instead of the data options")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="with --data: the split to calibrate on; never the test split nor the training images "
                        "(both refused before anything is scored); the layouts hold no other split today, so "
                        f"prefer --normal DIR or train --calibrate (default: {CALIBRATION_SPLIT})")
    p.add_argument("--allow-training-images", action="store_true",
                   help="with --data --split train: calibrate on the model's own training images anyway (when no "
                        "other normal images exist). Their scores are lower than fresh images', so the threshold "
                        "flags more than --target-fpr on new data; the checkpoint records that it was picked so")
    p.add_argument("--target-fpr", type=fraction, default=None, metavar="RATE",
                   help=f"false-positive rate on normal images when the set has no anomalies (default: {TARGET_FPR})")
    p.add_argument("--out", metavar="PATH",
                   help="write the calibrated checkpoint here instead of updating --checkpoint in place")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images scored per batch (default: %(default)s)")
    p.add_argument("--device", default=None, metavar="cpu|cuda",
                   help=f"device to score on (default: {default_of('calibrate', 'device')})")
    p.add_argument("--dtype", type=precision_or_int8, default=None, metavar="float32|bfloat16|float16|auto|int8",
                   help="precision the calibration set is scored in, recorded in the checkpoint; ckaad-fast score "
                        "then scores in it by default, so that its decisions on this set are the promised ones. "
                        "float32 gives the same scores on every CPU and GPU; bfloat16 is faster where "
                        "the hardware multiplies it (auto picks it there). int8: first quantize the graph with "
                        "NNCF on the set's normal images (OpenVINO runs it; see the int8 options), then pick the "
                        "threshold on its scores; the checkpoint stores the quantized graph and what it cost "
                        f"(default: {default_of('calibrate', 'precision')})")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="who scores the set (recorded; ckaad-fast score then uses the same by default, so its "
                        "decisions on this set are the promised ones): auto, the fastest installed here (torch on "
                        "a GPU; openvino, else onnxruntime, else torch on the CPU), or torch, openvino, "
                        f"onnxruntime (default: {default_of('calibrate', 'engine')})")
    p.add_argument("--num-workers", type=nonneg_int, default=0, metavar="N",
                   help="data-loading worker processes (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    q = p.add_argument_group("int8 (with --dtype int8)")
    q.add_argument("--int8-check-normal", metavar="DIR",
                   help="normal images held out from training (a folder, searched recursively) to check int8's "
                        "accuracy on, with --int8-check-anomalous; NNCF then puts operations back into float32 "
                        "until the image AUROC there drops by at most --max-auroc-drop. Without them: the "
                        "calibration set itself when it holds anomalies, else plain post-training quantization")
    q.add_argument("--int8-check-anomalous", metavar="DIR",
                   help="anomalous images for the int8 check (a folder, searched recursively)")
    q.add_argument("--max-auroc-drop", type=fraction_or_zero, default=None, metavar="D",
                   help="the largest image AUROC drop int8 may cost on the check set, absolute (default: "
                        f"{DEFAULT_MAX_AUROC_DROP}, half a point); a bound it cannot meet is refused, and so is a "
                        "check set too small to measure it")
    q.add_argument("--int8-scope", choices=SCOPES, default=DEFAULT_SCOPE,
                   help="what is quantized: autoencoder (its convolutions; the backbone stays float32: scores "
                        "move by a few percent) or network (the backbone too: faster, less accurate; use a check "
                        "set) (default: %(default)s)")
    add_tiling_arguments(p, sets=False)
    g = p.add_argument_group("data (instead of --normal)")
    add_data_arguments(g, required=False)
    p.set_defaults(func=run, interrupted=lambda a: "nothing was written; the checkpoint is unchanged")
    return p


def run(args) -> int:
    from ..calibration import (
        calibrate,
        check_calibration_out,
        check_calibration_split,
        normal_folder_set,
        write_calibration,
    )
    from ..model import check_recorded_tiling, model_from_checkpoint

    if (args.normal is None) == (args.data is None):
        raise ValueError("--normal DIR or --data ROOT (with its layout options): give exactly one")
    check_calibration_out(args.out)
    if args.max_auroc_drop is not None and args.dtype != "int8":
        raise ValueError("--max-auroc-drop: only with --dtype int8 (it bounds what quantization may cost)")
    int8_options = {} if args.max_auroc_drop is None else {"max_auroc_drop": args.max_auroc_drop}
    split = None
    if args.data is not None:
        split = check_calibration_split(args.split, args.layout, args.allow_training_images)
    elif args.allow_training_images:
        raise ValueError("--allow-training-images: only with --data --split train")
    try:
        model = model_from_checkpoint(args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--checkpoint: {e}") from None
    cfg = model.config
    check_recorded_tiling(cfg, args.tile_size, args.tile_stride)
    if args.normal is not None:
        data = normal_folder_set(args.normal, cfg.source_size, cfg.mean, cfg.std)
    else:
        data = dataset_from_args(args, split, cfg.source_size, cfg.mean, cfg.std)
    cal = calibrate(model, data, batch_size=args.batch_size, progress=not args.quiet,
                    on_training_images=args.data is not None and split == "train", check=_int8_check(args, cfg),
                    int8_scope=args.int8_scope, **int8_options,
                    **given(target_fpr=args.target_fpr, device=args.device, precision=args.dtype, engine=args.engine))
    written = write_calibration(args.checkpoint, cal, out=args.out)
    print(f"calibration: {cal.describe()}")
    print(f"written to:  {written}")
    return 0


def _int8_check(args, cfg):
    """The int8 check set of --int8-check-normal and --int8-check-anomalous (both or neither)."""
    given = (args.int8_check_normal, args.int8_check_anomalous)
    if given == (None, None):
        return None
    if None in given:
        raise ValueError("--int8-check-normal and --int8-check-anomalous: give both (or neither)")
    if args.dtype != "int8":
        raise ValueError("--int8-check-normal: only with --dtype int8")
    from torch.utils.data import ConcatDataset

    from ..calibration import normal_folder_set
    from ..data import AnomalyFolderDataset
    from ..errors import ArgumentError

    try:
        normal = normal_folder_set(args.int8_check_normal, cfg.source_size, cfg.mean, cfg.std)
    except ArgumentError as e:
        raise ValueError(f"--int8-check-normal: {e.message}") from None
    try:
        anomalous = AnomalyFolderDataset(args.int8_check_anomalous, cfg.source_size, cfg.mean, cfg.std)
    except ValueError as e:
        raise ValueError(f"--int8-check-anomalous: {e}") from None
    return ConcatDataset([normal, anomalous])
