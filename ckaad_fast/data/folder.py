"""Class-folder data (Chest X-ray, OCT, ...): ``ROOT/{train,test}/CLASS/``."""
from __future__ import annotations

import os
from collections.abc import Sequence

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import describe, images_in_dir, subdirs
from .images import SizeLike
from .base import ImageFileDataset, PathLike

__all__ = ["FolderDataset"]


class FolderDataset(ImageFileDataset):
    """Class-folder data (the medical sets: Chest X-ray, OCT, Br35H, ISIC after sorting by class).

    Expected layout (one folder per class; images may sit in nested sub-folders)::

        root/train/<normal_class>/*.png|jpg|...     normal training images
        root/train/<other class>/...                optional: the pool for sample_coarse_anomalies
        root/test/<normal_class>/...                normal test images (label 0)
        root/test/<anomaly class>/...               anomalous test images (label 1)

    (e.g. Chest X-ray: ``root=ChestXRay2017``, ``normal_class="NORMAL"``; OCT: ``root=OCT2017``,
    ``normal_class="NORMAL"``). ``split`` names the sub-folder of ``root`` to read (``train``,
    ``test``, or another such as ``val``). With ``split="train"`` only ``normal_class`` is served;
    otherwise the normal class and ``anomaly_classes`` (default: every other class folder). There
    are no masks. Items are ``(image, label, path)``. Attributes: ``paths``, ``labels``,
    ``classes`` (per item), ``paths_by_class`` (every class folder of the split, unverified; used by
    :func:`sample_coarse_anomalies`), ``anomaly_classes``, ``skipped``.
    """

    def __init__(
        self,
        root: PathLike,
        normal_class: str,
        anomaly_classes: Sequence[str] | None = None,
        split: str = "train",
        image_size: SizeLike = 256,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        check: str = "verify",
    ) -> None:
        super().__init__(image_size, mean, std, check)
        self.root = os.fspath(root)
        self.normal_class = normal_class
        self.split = split
        layout = (
            "expected class-folder layout root/<split>/<class>/<images> with root/train/<normal_class>/ "
            "and root/test/<class>/ for each class"
        )
        split_dir = os.path.join(self.root, split)
        classes = subdirs(split_dir)
        if not classes:
            where = split_dir if os.path.isdir(split_dir) else self.root
            raise ValueError(f"no class folders for split {split!r}: {layout}; {describe(where)}")
        if normal_class not in classes:
            raise ValueError(
                f"normal class folder {normal_class!r} not found in {split_dir!r}: {layout}; found classes {classes}"
            )
        paths_by_class = {c: images_in_dir(os.path.join(split_dir, c), recursive=True) for c in classes}
        self._index(paths_by_class, anomaly_classes, split_dir, layout)

    def _index(self, paths_by_class: dict[str, list[str]], anomaly_classes, where: str, layout: str) -> None:
        """Index the images of every class (``paths_by_class``, the normal class among them): the
        part shared by every class-labelled layout (folders here, CSV-labelled ones in
        :mod:`.medical`). Serves the normal class on ``train``, every chosen class otherwise."""
        normal_class, split = self.normal_class, self.split
        classes = sorted(paths_by_class)
        others = [c for c in classes if c != normal_class]
        if anomaly_classes is None:
            anomaly_classes = others
        else:
            anomaly_classes = [anomaly_classes] if isinstance(anomaly_classes, str) else list(anomaly_classes)
            bad = [c for c in anomaly_classes if c not in others]
            if bad:
                raise ValueError(
                    f"anomaly classes {bad} not found in {where!r} (or equal to the normal class); "
                    f"found classes {classes}"
                )
        self.anomaly_classes = list(anomaly_classes)
        self.paths_by_class = {c: list(paths_by_class[c]) for c in classes}
        if not self.paths_by_class[normal_class]:
            raise ValueError(f"no images of the normal class {normal_class!r} in {where!r}: {layout}")
        served = [normal_class] if split == "train" else [normal_class, *self.anomaly_classes]
        items = [(p, int(c != normal_class), c) for c in served for p in self.paths_by_class[c]]
        items.sort(key=lambda it: it[0])
        kept = [it for it in items if self._keep(it[0])]
        if not kept:
            raise ValueError(f"no readable images in {where!r} for classes {served} ({len(self.skipped)} skipped)")
        self.paths = [it[0] for it in kept]
        self.labels = [it[1] for it in kept]
        self.classes = [it[2] for it in kept]

    @property
    def num_normal(self) -> int:
        return sum(1 for lab in self.labels if lab == 0)

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        return self._load(path), self.labels[idx], path
