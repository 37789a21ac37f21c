"""``ckaad-fast eval``: score a test split with a trained checkpoint, print and save the metrics.

A thin layer over :func:`ckaad_fast.evaluation.evaluate_model`. Under ``torchrun`` the test set is
sharded over the processes and the predictions gathered on rank 0, which prints (and saves) the
metrics: the same as one process's.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..atomic import atomic_write_text
from ._types import nonneg_int, positive_int
from .train import add_data_arguments, build_dataset

_ORDER = ("image_auroc", "image_f1", "image_acc", "pixel_auroc", "aupro", "aupro_per_image")
_NAMES = {
    "image_auroc": "image AUROC",
    "image_f1": "image best F1",
    "image_acc": "image accuracy (at best F1)",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO (standard, FPR <= 0.3)",
    "aupro_per_image": "AUPRO (reference per-image protocol)",
    "num_images": "test images",
    "num_anomalous": "anomalous test images",
}


def format_metrics(metrics: dict) -> str:
    """A two-column table of the metrics, the paper's metrics first (values as percentages)."""
    keys = [k for k in _ORDER if k in metrics] + [k for k in metrics if k not in _ORDER]
    rows = []
    for k in keys:
        v = metrics[k]
        text = f"{100 * v:.2f}" if k in _ORDER and isinstance(v, float) else str(v)
        rows.append((_NAMES.get(k, k), text))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric'.ljust(width)}  value (%)", f"{'-' * width}  ---------"]
    lines += [f"{name.ljust(width)}  {text}" for name, text in rows]
    return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="score a test split with a trained checkpoint and report image/pixel AUROC, F1, AUPRO",
        description="Evaluate a checkpoint written by `ckaad-fast train` on the test split of a data set: "
                    "image AUROC, best F1 and its accuracy, and, where masks exist, pixel AUROC and AUPRO "
                    "(standard and the reference code's per-image protocol).",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file written by `ckaad-fast train` (or its output folder)")
    add_data_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images scored per batch (per process under torchrun) (default: %(default)s)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda",
                   help="device to score on, e.g. cpu, cuda (default: %(default)s)")
    p.add_argument("--num-workers", type=nonneg_int, default=0, metavar="N",
                   help="data-loading worker processes (default: %(default)s)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the metrics to FILE as JSON (written atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..distributed import distributed_session

    # Under torchrun: join the process group (NCCL for a CUDA device, gloo on the CPU); else nothing.
    with distributed_session(args.device) as dist_info:
        return _run(args, dist_info)


def _run(args, dist_info) -> int:
    import torch

    from ..distributed import local_device
    from ..evaluation import evaluate_model
    from ..model import load_checkpoint, model_from_checkpoint
    from ..training import CHECKPOINT_NAME

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {str(path)!r} does not exist")
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: {args.device!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    device = torch.device(local_device(device))  # cuda:LOCAL_RANK under torchrun
    try:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, map_location=device)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--checkpoint: {e}") from None
    cfg = model.config
    test_set = build_dataset(args, "test", cfg.image_size, cfg.mean, cfg.std)
    metrics = evaluate_model(model, test_set, batch_size=args.batch_size, device=device,
                             progress=not args.quiet and dist_info.is_main, num_workers=args.num_workers,
                             distributed=dist_info.distributed)
    if not dist_info.is_main:
        return 0
    print(format_metrics(metrics))
    if args.json:
        record = {
            **metrics,
            "checkpoint": str(path),
            "data": str(args.data),
            "layout": args.layout,
            "category": args.category,
            "epoch": ckpt.get("epoch"),
            "strategy": cfg.strategy,
            "backbone": cfg.backbone,
        }
        write_json_atomic(args.json, record)
        print(f"metrics written to {args.json}")
    return 0
