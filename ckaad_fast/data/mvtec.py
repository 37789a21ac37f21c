"""MVTec AD's layout: ``ROOT/CATEGORY/{train,test,ground_truth}``."""
from __future__ import annotations

import os
from collections.abc import Sequence

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import IMAGE_EXTENSIONS, describe, images_in_dir, subdirs, warn_skip
from .images import DEFAULT_MASK_RESIZE, SizeLike
from .base import MaskedImageDataset, PathLike

__all__ = ["MVTecDataset"]


def _find_mask(gt_dir: str, stem: str) -> str | None:
    for name in (stem + "_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = os.path.join(gt_dir, name + e)
                if os.path.isfile(p):
                    return p
    return None


class MVTecDataset(MaskedImageDataset):
    """One category of MVTec AD (or any data set laid out the same way).

    Expected layout::

        root/<category>/train/good/*.png                  normal training images
        root/<category>/test/good/*.png                   normal test images
        root/<category>/test/<defect>/*.png               anomalous test images
        root/<category>/ground_truth/<defect>/<name>_mask.png   their masks

    (``<name>.png`` is also accepted as a mask name, and any of :data:`IMAGE_EXTENSIONS` for both.)

    Items are ``(image (3,H,W), label, mask (1,H,W), path)`` with label 0 for ``good`` and 1
    otherwise; masks of normal images are zeros; ``mask_resize`` is ``"nearest"`` (ours) or
    ``"bilinear"`` (the authors' rule; see :func:`~.images.load_mask`). ``split="train"`` yields only the normal images
    of ``train/good``. Attributes: ``paths``, ``labels``, ``mask_paths`` (None for normal images),
    ``defect_types`` (per item, ``"good"`` for normal), ``skipped``.
    """

    def __init__(
        self,
        root: PathLike,
        category: str,
        split: str = "train",
        image_size: SizeLike = 256,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        check: str = "verify",
        mask_resize: str = DEFAULT_MASK_RESIZE,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        super().__init__(root, category, split, image_size, mean, std, check, mask_resize)
        layout = (
            "expected MVTec layout root/<category>/train/good/*.png, root/<category>/test/<good|defect>/"
            "*.png and root/<category>/ground_truth/<defect>/<name>_mask.png"
        )
        cat_dir = os.path.join(self.root, category)
        if not os.path.isdir(cat_dir):
            raise ValueError(
                f"MVTec category {category!r} not found: {layout}; {describe(self.root)}"
            )
        split_dir = os.path.join(cat_dir, split)
        if not os.path.isdir(split_dir):
            raise ValueError(f"no {split!r} folder for category {category!r}: {layout}; {describe(cat_dir)}")

        items: list[tuple[str, int, str | None, str]] = []  # path, label, mask path, defect type
        if split == "train":
            good = os.path.join(split_dir, "good")
            if not os.path.isdir(good):
                raise ValueError(f"no train/good folder: {layout}; {describe(split_dir)}")
            imgs = images_in_dir(good, recursive=False)
            if not imgs:
                raise ValueError(f"no images in {good!r}: {layout}; {describe(good)}")
            items = [(p, 0, None, "good") for p in imgs]
        else:
            defects = subdirs(split_dir)
            if not defects:
                raise ValueError(f"no class folders in {split_dir!r}: {layout}; {describe(split_dir)}")
            gt_root = os.path.join(cat_dir, "ground_truth")
            for defect in defects:
                d = os.path.join(split_dir, defect)
                imgs = images_in_dir(d, recursive=False)
                if defect == "good":
                    items.extend((p, 0, None, "good") for p in imgs)
                    continue
                gt_dir = os.path.join(gt_root, defect)
                if imgs and not os.path.isdir(gt_dir):
                    raise ValueError(
                        f"no mask folder {gt_dir!r} for defect type {defect!r}: {layout}; "
                        f"{describe(gt_root)}"
                    )
                for p in imgs:
                    stem = os.path.splitext(os.path.basename(p))[0]
                    mp = _find_mask(gt_dir, stem)
                    if mp is None:
                        warn_skip(p, f"no mask {stem}_mask.png in {gt_dir!r}")
                        self.skipped.append(p)
                        continue
                    items.append((p, 1, mp, defect))
            if not items and not self.skipped:
                raise ValueError(f"no images under {split_dir!r}: {layout}; {describe(split_dir)}")

        self.defect_types = [it[3] for it in self._keep_all(items, "MVTec")]
