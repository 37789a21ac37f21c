"""Any of the library's data sets from a layout name: what ``ckaad-fast train``, ``eval`` and
``calibrate`` call with their data options."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

from ..errors import ArgumentError
from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import describe, subdirs
from .images import DEFAULT_MASK_RESIZE, SizeLike, check_mask_resize
from .base import ImageFileDataset
from .registry import LAYOUT_TABLE, LAYOUTS

__all__ = ["LAYOUTS", "open_dataset", "list_categories"]

PathLike = Union[str, os.PathLike]



def open_dataset(
    layout: str,
    root: PathLike,
    split: str,
    image_size: SizeLike = 256,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    *,
    category: str | None = None,
    normal_class: str | None = None,
    anomaly_classes: Sequence[str] | None = None,
    mask_resize: str = DEFAULT_MASK_RESIZE,
) -> ImageFileDataset:
    """The ``split`` ("train" or "test") of the data set at ``root`` laid out as ``layout``.

    ``layout``: "mvtec" (:class:`MVTecDataset`, needs ``category``), "visa" (:class:`VisADataset`,
    needs ``category``), "folder" (:class:`FolderDataset`, needs ``normal_class``; ``category``,
    when given, is a sub-folder of ``root``; ``anomaly_classes`` defaults to every other class),
    "isic2018" (:class:`~.medical.ISIC2018Dataset`; ``anomaly_classes`` picks some of its six) or
    "br35h" (:class:`~.medical.Br35HDataset`). ``mask_resize`` ("nearest", ours, or "bilinear", the
    authors'; see :func:`~.images.load_mask`) applies to the layouts with masks.
    Every error is an :class:`~ckaad_fast.errors.ArgumentError` naming the argument at fault.
    """
    root = _check_layout_arguments(layout, root, category, normal_class, anomaly_classes)
    try:
        check_mask_resize(mask_resize)
    except ValueError as e:
        raise ArgumentError("mask_resize", str(e)) from None
    try:
        return LAYOUT_TABLE[layout].read(root, split, image_size, mean, std, category, normal_class,
                                         anomaly_classes, mask_resize)
    except ArgumentError:
        raise
    except ValueError as e:
        detail = f"layout {layout}" + (f", category {category}" if category else "")
        raise ArgumentError("root", f"{os.fspath(root)!r} ({detail}): {e}") from None


def _check_layout_arguments(layout, root, category, normal_class, anomaly_classes) -> str:
    """The folder to read (``root``, or ``root/category`` for class folders), or why not."""
    if layout not in LAYOUTS:
        raise ArgumentError("layout", f"must be one of {LAYOUTS}, got {layout!r}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ArgumentError("root", f"folder {root!r} does not exist")
    spec = LAYOUT_TABLE[layout]
    if spec.needs_category and not category:
        raise ArgumentError("category", f"required with layout {layout}")
    if spec.fixed_classes:
        if normal_class:
            raise ArgumentError("normal_class", f"layout {layout} fixes its normal class; leave it out")
        if anomaly_classes and layout == "br35h":
            raise ArgumentError("anomaly_classes", "layout br35h has one anomaly class (yes); leave it out")
        return os.path.join(root, category) if category else root
    if layout != "folder":
        if normal_class or anomaly_classes:
            raise ArgumentError("normal_class", f"normal_class and anomaly_classes apply to layout folder only, "
                                f"not {layout}")
        return root
    if not normal_class:
        raise ArgumentError("normal_class", "required with layout folder")
    if category:
        root = os.path.join(root, category)
        if not os.path.isdir(root):
            raise ArgumentError("category", f"folder {root!r} does not exist")
    return root


def list_categories(layout: str, root: PathLike) -> list[str]:
    """The categories of an industrial data set, sorted: MVTec's folders holding ``train/good``,
    VisA's objects in ``split_csv/1cls.csv``. Raises :class:`~ckaad_fast.errors.ArgumentError`
    (naming ``root``) when there is none."""
    import csv

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ArgumentError("root", f"folder {root!r} does not exist")
    if layout == "mvtec":
        found = [c for c in subdirs(root) if os.path.isdir(os.path.join(root, c, "train", "good"))]
        expected = "category folders ROOT/<category>/train/good"
    elif layout == "visa":
        table = os.path.join(root, "split_csv", "1cls.csv")
        if not os.path.isfile(table):
            raise ArgumentError("root", f"VisA split file {table!r} not found; {describe(root)}")
        with open(table, newline="", encoding="utf-8") as f:
            found = sorted({(r.get("object") or "").strip() for r in csv.DictReader(f)} - {""})
        expected = "objects in split_csv/1cls.csv"
    else:
        raise ArgumentError("layout", f"categories are listed for layouts mvtec and visa, not {layout!r}")
    if not found:
        raise ArgumentError("root", f"no {expected} in {root!r}; {describe(root)}")
    return found
