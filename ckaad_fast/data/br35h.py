"""Br35H as its users download it: ``root/yes/*.jpg`` (tumour) and ``root/no/*.jpg`` (normal), no
predefined split: as in the authors' code, each class is sorted by file name and its first 80%
is ``train``, the rest ``test``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import describe, images_in_dir
from .images import SizeLike
from .base import ImageFileDataset, PathLike
from .folder import FolderDataset

__all__ = ["Br35HDataset", "BR35H_TRAIN_SHARE"]

BR35H_TRAIN_SHARE = 0.8


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
