"""The paper's medical data sets in the layouts their users download: ISIC 2018 task 3 and Br35H.

Both are class-labelled data sets like :class:`~.layouts.FolderDataset` (and are ones: the
coarse-anomaly protocol of :func:`~.anomalies.sample_coarse_anomalies` applies to them as to class
folders); only how the classes are read differs.

ISIC 2018 task 3 (:class:`ISIC2018Dataset`)::

    root/ISIC2018_Task3_Training_Input/*.jpg
    root/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    root/ISIC2018_Task3_Validation_Input/*.jpg
    root/ISIC2018_Task3_Validation_GroundTruth/ISIC2018_Task3_Validation_GroundTruth.csv

The CSV has a column ``image`` (the file name without extension) and one-hot columns MEL, NV, BCC,
AKIEC, BKL, DF, VASC. NV (melanocytic nevi) is normal, the six others are the anomaly classes;
``split="train"`` reads the Training files, ``"test"`` the Validation files, which is what the
authors' code tests on.

Br35H (:class:`Br35HDataset`): ``root/yes/*.jpg`` (tumour) and ``root/no/*.jpg`` (normal), no
predefined split: as in the authors' code, each class is sorted by file name and its first 80%
is ``train``, the rest ``test``.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Union

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import IMAGE_EXTENSIONS, describe, images_in_dir
from .images import SizeLike
from .layouts import FolderDataset, ImageFileDataset

__all__ = ["ISIC2018Dataset", "Br35HDataset", "ISIC_CLASSES", "ISIC_NORMAL", "BR35H_TRAIN_SHARE"]

PathLike = Union[str, os.PathLike]

ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_NORMAL = "NV"
_ISIC_SPLITS = {"train": "Training", "test": "Validation"}
BR35H_TRAIN_SHARE = 0.8


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


class Br35HDataset(FolderDataset):
    """Br35H: ``root/no`` normal, ``root/yes`` tumours, each class split 80/20 by sorted file name
    (see the module). Items are ``(image, label, path)``."""

    def __init__(self, root: PathLike, split: str = "train", image_size: SizeLike = 256,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 check: str = "verify") -> None:
        ImageFileDataset.__init__(self, image_size, mean, std, check)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root, self.split, self.normal_class = os.fspath(root), split, "no"
        layout = "expected Br35H layout root/no/*.jpg (normal) and root/yes/*.jpg (tumour)"
        by_class = {}
        for c in ("no", "yes"):
            folder = os.path.join(self.root, c)
            if not os.path.isdir(folder):
                raise ValueError(f"class folder {folder!r} not found: {layout}; {describe(self.root)}")
            paths = sorted(images_in_dir(folder, recursive=False), key=os.path.basename)
            if not paths:
                raise ValueError(f"no images in {folder!r}: {layout}")
            cut = int(round(BR35H_TRAIN_SHARE * len(paths)))
            by_class[c] = paths[:cut] if split == "train" else paths[cut:]
        self._index(by_class, None, self.root, layout)
