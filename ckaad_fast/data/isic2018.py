"""ISIC 2018 task 3 as its users download it: a class-labelled data set like
:class:`~.folder.FolderDataset` (and one: the coarse-anomaly protocol applies to it as to class
folders); only how the classes are read differs::

    root/ISIC2018_Task3_Training_Input/*.jpg
    root/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    root/ISIC2018_Task3_Validation_Input/*.jpg
    root/ISIC2018_Task3_Validation_GroundTruth/ISIC2018_Task3_Validation_GroundTruth.csv

The CSV has a column ``image`` (the file name without extension) and one-hot columns MEL, NV, BCC,
AKIEC, BKL, DF, VASC. NV (melanocytic nevi) is normal, the six others are the anomaly classes;
``split="train"`` reads the Training files, ``"test"`` the Validation files, which is what the
authors' code tests on.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import IMAGE_EXTENSIONS, describe
from .images import SizeLike
from .base import ImageFileDataset, PathLike
from .folder import FolderDataset

__all__ = ["ISIC2018Dataset", "ISIC_CLASSES", "ISIC_NORMAL"]

ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_NORMAL = "NV"
_ISIC_SPLITS = {"train": "Training", "test": "Validation"}

class ISIC2018Dataset(FolderDataset):
    """ISIC 2018 task 3, read through its ground-truth CSV (see the module). Items are
    ``(image, label, path)`` as for :class:`FolderDataset`; ``anomaly_classes`` picks some of the
    six anomaly classes (default: all)."""

    def __init__(self, root: PathLike, split: str = "train", image_size: SizeLike = 256,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 check: str = "verify", anomaly_classes: Sequence[str] | None = None) -> None:
        ImageFileDataset.__init__(self, image_size, mean, std, check)
        if split not in _ISIC_SPLITS:
            raise ValueError(f"split must be one of {tuple(_ISIC_SPLITS)}, got {split!r}")
        self.root, self.split, self.normal_class = os.fspath(root), split, ISIC_NORMAL
        name = _ISIC_SPLITS[split]
        images = os.path.join(self.root, f"ISIC2018_Task3_{name}_Input")
        table = os.path.join(self.root, f"ISIC2018_Task3_{name}_GroundTruth", f"ISIC2018_Task3_{name}_GroundTruth.csv")
        layout = ("expected ISIC 2018 task 3 layout root/ISIC2018_Task3_{Training,Validation}_Input/*.jpg and "
                  "root/ISIC2018_Task3_{Training,Validation}_GroundTruth/ISIC2018_Task3_..._GroundTruth.csv")
        if not os.path.isfile(table):
            raise ValueError(f"ground-truth CSV {table!r} not found: {layout}; {describe(self.root)}")
        if not os.path.isdir(images):
            raise ValueError(f"image folder {images!r} not found: {layout}; {describe(self.root)}")
        self._index(_isic_classes(table, images), anomaly_classes, table, layout)


def _isic_classes(table: str, images: str) -> dict[str, list[str]]:
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("image", *ISIC_CLASSES) if c not in header]
        unknown = [c for c in header if c not in ("image", *ISIC_CLASSES)]
        if missing or unknown:
            raise ValueError(f"{table!r}: expected the columns image, {', '.join(ISIC_CLASSES)}; "
                             f"missing {missing}, unknown {unknown}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    by_class: dict[str, list[str]] = {c: [] for c in ISIC_CLASSES}
    for r in rows:
        hot = [c for c in ISIC_CLASSES if float(r[c] or 0) >= 0.5]
        if len(hot) != 1:
            raise ValueError(f"{table!r}: image {r['image']!r} must have exactly one class, got {hot or 'none'}")
        path = next((os.path.join(images, r["image"] + e) for e in (".jpg", *IMAGE_EXTENSIONS)
                     if os.path.isfile(os.path.join(images, r["image"] + e))), None)
        if path is not None:
            by_class[hot[0]].append(path)
    empty = [c for c, paths in by_class.items() if not paths and c == ISIC_NORMAL]
    if empty:
        raise ValueError(f"{table!r}: no image of the normal class {ISIC_NORMAL} found in {images!r}")
    return {c: sorted(p) for c, p in by_class.items() if p}
