"""``ckaad-fast experiment``: one of the paper's tables from one command, resumable run by run.

A thin layer over :class:`ckaad_fast.experiments.Experiment` (the protocols and defaults) and
:func:`ckaad_fast.experiments.run_experiment` (the runs, the CSVs, the Markdown table).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.registry import DEFAULT_LAYOUT
from ..training.config import DEFAULT_PROTOCOL, PROTOCOLS
from . import COMMANDS
from ._types import add_tiling_arguments, nonneg_int, positive_float, positive_int, ratio_float
from .train import layer_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..data import LAYOUTS
    from ..experiments import TABLES
    from ..strategies import STRATEGIES

    p = subparsers.add_parser(
        "experiment",
        help=COMMANDS["experiment"],
        description="Run every training run of one of the paper's tables on one data set, then write the results "
                    "(OUT/results.csv, OUT/by_defect_type.csv) and the table in the paper's format (OUT/table.md). "
                    "table1: the medical protocol (a class-labelled layout), the strategies at each r_l, k = 1 "
                    "averaged over the anomaly classes (k > 1: over random draws of k classes), AUC, F1, ACC. "
                    "table2: MVTec AD or VisA, every category, I-AUROC, P-AUROC and both PRO definitions. table3: "
                    "the five strategies side by side (r_l 5%%, k = 1 on class-labelled data; pseudo-anomalies on "
                    "industrial data). Finished runs are never redone: run the same command again to continue.",
    )
    p.add_argument("table", choices=TABLES, help="which table to make")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="ROOT", help="data set root folder (as for `ckaad-fast train`)")
    g.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help="how the data set is laid out (default: %(default)s)")
    g.add_argument("--categories", nargs="+", metavar="NAME",
                   help="mvtec/visa: the categories to run (default: every one found); folder: one sub-folder of ROOT")
    g.add_argument("--normal-class", metavar="NAME", help="--layout folder: the normal class folder (required there)")
    g.add_argument("--anomaly-dir", metavar="DIR",
                   help="mvtec/visa: labelled anomalies instead of the elastic pseudo-anomalies; {category} in DIR is "
                        "replaced by each category (e.g. ROOT/{category}/coarse_anomalies)")
    g = p.add_argument_group("protocol")
    g.add_argument("--strategies", nargs="+", choices=STRATEGIES, metavar="NAME",
                   help=f"the rows, among {', '.join(STRATEGIES)} (default: table1 recon cka_patch; table2 cka_patch; "
                        "table3 all five)")
    g.add_argument("--ratios", nargs="+", type=ratio_float, metavar="R_L",
                   help="table1: the ratios r_l of labelled anomalies (default: 0 0.01 0.02 0.05)")
    g.add_argument("--num-anomaly-classes", type=positive_int, default=1, metavar="K",
                   help="k, the number of anomaly classes the labelled anomalies come from (default: %(default)s)")
    g.add_argument("--draws", type=positive_int, default=5, metavar="N",
                   help="with k > 1: the number of random class draws averaged (default: %(default)s, as Figure 2)")
    g.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="one run per seed; the tables show mean ± std over them and each strategy's paired "
                        "difference to Recon with its 95%% interval (default: 0 1 2 3 4, the fewest for an "
                        "interval that tells apart strategies a couple of points apart)")
    g.add_argument("--protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL,
                   help="reference: the authors' anomaly loader, loss averaging and bilinear mask resize, to "
                        "compare with their numbers (default: %(default)s)")
    g = p.add_argument_group("training (default: the authors' settings for the layout and category)")
    g.add_argument("--epochs", type=positive_int, metavar="N", help="epochs of every run")
    g.add_argument("--batch-size", type=positive_int, metavar="N", help="normal images per step")
    g.add_argument("--image-size", type=positive_int, metavar="PX", help="images are resized to PX x PX")
    g.add_argument("--backbone", metavar="NAME", help="the frozen feature extractor (a name of `ckaad-fast train`)")
    g.add_argument("--layers", type=layer_int, nargs="+", metavar="L", help="backbone layers to reconstruct")
    g.add_argument("--weights", metavar="imagenet|none|PATH", help="backbone weights")
    g.add_argument("--ae-lr", type=positive_float, metavar="LR", help="auto-encoder learning rate")
    g.add_argument("--device", metavar="cpu|cuda", help="device to train and score on (default: cpu)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision")
    g.add_argument("--num-workers", type=nonneg_int, metavar="N",
                   help="data-loading worker processes per run (JPEG data sets decode every epoch: use several)")
    add_tiling_arguments(p, sets=True)
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="the experiment's folder (results, table, runs)")
    g.add_argument("--dry-run", action="store_true", help="list the runs the experiment takes, and which are done")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, interrupted=lambda a: f"finished runs are kept in {a.out}; run the same command to continue")
    return p


_SETTINGS = ("epochs", "batch_size", "image_size", "tile_size", "tile_stride", "memory_candidates", "memory_norm_cell", "backbone", "layers", "weights", "ae_lr", "device", "amp",
             "num_workers")


def build_experiment(args):
    """The :class:`~ckaad_fast.experiments.Experiment` the options describe."""
    from ..experiments import Experiment

    settings = {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}
    seeds = {} if args.seeds is None else {"seeds": tuple(args.seeds)}  # the API's default otherwise
    return Experiment(args.table, args.layout, args.data, categories=args.categories, normal_class=args.normal_class,
                      strategies=args.strategies, ratios=args.ratios, num_classes=args.num_anomaly_classes,
                      draws=args.draws, protocol=args.protocol,
                      anomaly_dir=args.anomaly_dir, settings=settings, **seeds)


def run(args) -> int:
    from ..experiments import run_experiment

    exp = build_experiment(args)
    rows = run_experiment(exp, args.out, progress=not args.quiet, dry_run=args.dry_run)
    if args.dry_run:
        done = sum(r["done"] for r in rows)
        for r in rows:
            print(("done  " if r["done"] else "todo  ") + r["run_id"])
        print(f"{len(rows)} runs, {done} done, {len(rows) - done} to make", file=sys.stderr)
        return 0
    print(Path(args.out, "table.md").read_text(encoding="utf-8"), end="")
    return 0
