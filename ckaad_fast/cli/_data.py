"""The data-set options shared by ``train`` and ``eval``: the flags of
:func:`ckaad_fast.data.open_dataset`."""
from __future__ import annotations

import argparse

from ..data.images import DEFAULT_MASK_RESIZE, MASK_RESIZES
from ..data.registry import DEFAULT_LAYOUT, LAYOUTS


def add_data_arguments(p, required: bool = True) -> None:
    """--data, --category, --layout, --normal-class, --anomaly-classes, --mask-resize (into an argument group of
    their own, or into ``p`` itself when it is one)."""
    g = p if isinstance(p, argparse._ArgumentGroup) else p.add_argument_group("data")
    g.add_argument("--data", required=required, metavar="ROOT",
                   help="data set root folder: MVTec layout ROOT/CATEGORY/{train,test,ground_truth}; VisA "
                        "layout ROOT/split_csv/1cls.csv; folder layout ROOT/{train,test}/CLASS/ (or "
                        "ROOT/CATEGORY/{train,test}/CLASS/ when --category is given)")
    g.add_argument("--category", metavar="NAME",
                   help="the category: MVTec's folder name (e.g. bottle) or VisA's object name (e.g. candle); "
                        "required for --layout mvtec and visa; optional sub-folder of ROOT for --layout folder")
    g.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help="how the data set is laid out (default: %(default)s); 'folder' is class-folder data "
                        "such as Chest X-ray or OCT; 'isic2018' is ISIC 2018 task 3 as downloaded (images and "
                        "ground-truth CSV; NV normal, the Validation files as the test split); 'br35h' is Br35H's "
                        "yes/ and no/ folders, split 80/20 by sorted file name")
    g.add_argument("--normal-class", metavar="NAME",
                   help="--layout folder: the class folder holding normal images (e.g. NORMAL); required there")
    g.add_argument("--anomaly-classes", nargs="+", metavar="NAME",
                   help="--layout folder: the anomaly class folders to test on and to draw labelled anomalies "
                        "from (default: every class folder other than --normal-class)")
    g.add_argument("--mask-resize", choices=MASK_RESIZES, default=DEFAULT_MASK_RESIZE,
                   help="how ground-truth masks are brought to the image size: nearest (any non-zero pixel is "
                        "anomalous; no region is lost) or bilinear (the authors' code: bilinear, then > 0.5; "
                        "for comparing with their numbers) (default: %(default)s)")


def dataset_from_args(args, split: str, image_size, mean, std):
    """The ``split`` ("train" or "test") data set the data options name."""
    from ..data import open_dataset

    return open_dataset(args.layout, args.data, split, image_size, mean, std, category=args.category,
                        normal_class=args.normal_class, anomaly_classes=args.anomaly_classes,
                        mask_resize=getattr(args, "mask_resize", DEFAULT_MASK_RESIZE))
