"""``ckaad-fast eval``: score a test split with a trained checkpoint, print and save the metrics.

A thin layer over :func:`ckaad_fast.runtime.planned.evaluate_planned`: the checkpoint judged as it
is deployed (its calibration's precision and engine, by the execution plan's rule), unless
--dtype or --engine say otherwise. Under ``torchrun`` the test set is
sharded over the processes and the predictions gathered on rank 0, which prints (and saves) the
metrics: the same as one process's.
"""
from __future__ import annotations

import argparse
import os

from ..runtime.plan import ENGINES, default_of
from . import COMMANDS
from ._data import add_data_arguments, dataset_from_args
from ._types import add_tiling_arguments, nonneg_int, positive_int, precision_or_int8


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help=COMMANDS["eval"],
        description="Evaluate a checkpoint written by `ckaad-fast train` on the test split of a data set: "
                    "image AUROC, best F1 and its accuracy, and, where masks exist, pixel AUROC and AUPRO "
                    "(standard and the reference code's per-image protocol); then the same for each defect "
                    "type (MVTec's test sub-folders, VisA's image_anno.csv labels, the anomaly classes of class folders) "
                    "against the normal "
                    "images.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file written by `ckaad-fast train` (or its output folder)")
    add_data_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images scored per batch (per process under torchrun) (default: %(default)s)")
    p.add_argument("--device", default=None, metavar="cpu|cuda",
                   help=f"device to score on, e.g. cpu, cuda (default: {default_of('eval', 'device')})")
    p.add_argument("--dtype", type=precision_or_int8, default=None, metavar="float32|bfloat16|float16|auto|int8",
                   help="precision to score in; by default a calibrated checkpoint is judged as it is deployed, "
                        "in its calibration's precision (int8: its quantized graph), and an uncalibrated one in "
                        f"{default_of('eval', 'precision')}")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="who scores: by default a calibrated checkpoint's own engine (the one its threshold was "
                        f"picked with), else {default_of('eval', 'engine')}; or auto, torch, openvino, onnxruntime")
    p.add_argument("--num-workers", type=nonneg_int, default=0, metavar="N",
                   help="data-loading worker processes (default: %(default)s)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the metrics to FILE as JSON (written atomically)")
    p.add_argument("--chart", metavar="PNG",
                   help="also draw the per-defect-type table as bars (image AUROC, pixel AUROC, AUPRO) into PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, interrupted=lambda a: "nothing was written; run the command again")
    add_tiling_arguments(p, sets=False)
    return p


def run(args) -> int:
    from ..distributed import distributed_session
    from ..runtime.plan import device_name

    args.device = device_name("eval", args.device)
    # Under torchrun: join the process group (NCCL for a CUDA device, gloo on the CPU); else nothing.
    with distributed_session(args.device) as dist_info:
        return _run(args, dist_info)


def _device(text: str):
    import torch

    from ..distributed import local_device
    from ..precision import check_device_usable

    device = check_device_usable(text, "device")
    return torch.device(local_device(device))  # cuda:LOCAL_RANK under torchrun


def _run(args, dist_info) -> int:
    from ..atomic import atomic_write_json
    from ..evaluation import format_by_defect_type, format_metrics
    from ..runtime.planned import evaluate_planned
    from ..calibration import read_calibration
    from ..model import check_recorded_tiling, checkpoint_file, load_checkpoint, model_from_checkpoint

    for option, value in (("--json", args.json), ("--chart", args.chart)):
        if value and os.path.isdir(value):
            raise ValueError(f"{option}: {value!r} is a folder; give the name of the file to write")
    device = _device(args.device)
    try:
        ckpt = load_checkpoint(args.checkpoint)  # a file, or a run's output folder
        model = model_from_checkpoint(ckpt, map_location=device)
        # Read (and checked: a damaged int8 graph is refused) before anything is scored or printed.
        calibration = read_calibration(ckpt)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
        raise ValueError(f"--checkpoint: {e}") from None
    cfg = model.config
    check_recorded_tiling(cfg, args.tile_size, args.tile_stride)
    test_set = dataset_from_args(args, "test", cfg.source_size, cfg.mean, cfg.std)
    metrics = evaluate_planned(model, test_set, calibration, device=device, precision=args.dtype, engine=args.engine,
                               batch_size=args.batch_size, progress=not args.quiet and dist_info.is_main,
                               num_workers=args.num_workers, distributed=dist_info.distributed, by_defect_type=True)
    if not dist_info.is_main:
        return 0
    plan = metrics.pop("plan")
    print(f"scored by {plan['engine']} in {plan['precision']} on {plan['device']}")
    print(format_metrics(metrics))
    if metrics.get("by_defect_type"):
        print(format_by_defect_type(metrics))
    if args.chart:
        from ..evaluation import defect_type_chart
        from ..report import save_png

        chart = defect_type_chart(metrics)
        if chart is None:
            print("no chart: the test split has no defect types to draw")
        else:
            print(f"chart written to {save_png(chart, args.chart)}")
    print(f"calibration: {calibration.describe()}" if calibration is not None else
          "calibration: none (run ckaad-fast calibrate to give score a decision)")
    if args.json:
        record = {
            **metrics,
            "checkpoint": str(checkpoint_file(args.checkpoint)),
            "data": str(args.data),
            "layout": args.layout,
            "category": args.category,
            "epoch": ckpt.get("epoch"),
            "strategy": cfg.strategy,
            "backbone": cfg.backbone,
            "calibration": calibration.to_dict() if calibration is not None else None,
            "plan": plan,
        }
        atomic_write_json(args.json, record)
        print(f"metrics written to {args.json}")
    return 0
