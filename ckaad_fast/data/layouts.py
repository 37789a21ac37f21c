"""The data-set layouts CKAAD is trained and tested on: MVTec AD, VisA and class folders.

Item formats (the image always comes first, the label second and the file path last, so a
training loop can take ``batch[0]`` from any of them):

========================  =====================================================================
data set                  item
========================  =====================================================================
:class:`MVTecDataset`     ``(image (3,H,W) float32, label int 0/1, mask (1,H,W) float32 0/1, path)``
:class:`VisADataset`      same as MVTec
:class:`FolderDataset`    ``(image, label, path)``; class-folder data has no masks
========================  =====================================================================

Robustness: every data set checks its files when it indexes them (``PIL.Image.verify``, which is
cheap; ``check="load"`` fully decodes each file instead, ``check="none"`` skips the check). A file
that fails is left out with a :class:`~ckaad_fast.data.files.CorruptImageWarning` naming it, and
its path is appended to the data set's ``skipped`` list, so that ``__getitem__`` does not fail in
the middle of an epoch. A missing, empty or wrongly laid out folder raises :class:`ValueError`
saying which layout was expected and what was found.

:func:`ckaad_fast.data.open_dataset` builds any of them from a layout name, as ``ckaad-fast train``
and ``eval`` do.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Union

import torch
from torch.utils.data import Dataset

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import IMAGE_EXTENSIONS, check_mode, describe, images_in_dir, readable, subdirs, warn_skip
from .images import ImageRejected, SizeLike, check_mask_resize, load_image, load_mask, norm_stats, size_hw

__all__ = ["ImageFileDataset", "MVTecDataset", "VisADataset", "FolderDataset"]

PathLike = Union[str, os.PathLike]

class ImageFileDataset(Dataset):
    """The base of every image-file data set: transform parameters, the corrupt-file filter, and image loading."""

    def __init__(self, image_size: SizeLike, mean, std, check: str) -> None:
        # None: every image at its file's own size (a tiled model cuts its tiles from that).
        self.image_size = None if image_size is None else size_hw(image_size)
        self.mean, self.std = norm_stats(mean, std)
        self.check = check_mode(check)
        self.skipped: list[str] = []
        self.paths: list[str] = []
        self.labels: list[int] = []

    def _keep(self, path: str, mask_path: str | None = None) -> bool:
        """Check one image (and its mask); warn, record and return False when unreadable."""
        reason = readable(path, self.check, self.image_size)
        if reason is None and mask_path is not None:
            mr = readable(mask_path, self.check)
            if mr is not None:
                reason = f"its mask {mask_path!r} is unreadable ({mr})"
        if reason is not None:
            warn_skip(path, reason)
            self.skipped.append(path)
            return False
        return True

    def _load(self, path: str) -> torch.Tensor:
        try:
            return load_image(path, self.image_size, self.mean, self.std)
        except ImageRejected as e:  # only with check="none": the check would have left it out
            raise RuntimeError(f"image {path!r} cannot be used: {e}") from e
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"could not read image {path!r} ({type(e).__name__}: {e}); it passed the check at "
                "indexing time, so it changed since or is truncated (use check='load' to decode "
                "every file when indexing)"
            ) from e

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, anomalous={sum(self.labels)}, "
            f"image_size={self.image_size}, skipped={len(self.skipped)})"
        )



def _find_mask(gt_dir: str, stem: str) -> str | None:
    for name in (stem + "_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = os.path.join(gt_dir, name + e)
                if os.path.isfile(p):
                    return p
    return None


class MVTecDataset(ImageFileDataset):
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
        mask_resize: str = "nearest",
    ) -> None:
        super().__init__(image_size, mean, std, check)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.mask_resize = check_mask_resize(mask_resize)
        self.root = os.fspath(root)
        self.category = category
        self.split = split
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

        kept = [it for it in items if self._keep(it[0], it[2])]
        if not kept:
            raise ValueError(
                f"no readable images for MVTec category {category!r}, split {split!r} "
                f"({len(self.skipped)} skipped: {self.skipped[:5]})"
            )
        self.paths = [it[0] for it in kept]
        self.labels = [it[1] for it in kept]
        self.mask_paths = [it[2] for it in kept]
        self.defect_types = [it[3] for it in kept]

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        image = self._load(path)
        mask = load_mask(self.mask_paths[idx], self.image_size or tuple(image.shape[-2:]), self.mask_resize)
        return image, self.labels[idx], mask, path


class VisADataset(ImageFileDataset):
    """One category of VisA, read through its split file.

    Expected layout: ``root/split_csv/1cls.csv`` (or ``csv_path``) with the header
    ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly``; ``image`` and
    ``mask`` are paths relative to ``root`` (``mask`` is empty for normal images). Items are
    ``(image, label, mask, path)`` as for :class:`MVTecDataset`. ``split`` is matched against the
    csv's ``split`` column (``train`` or ``test`` in VisA's 1cls split). Where VisA's own
    ``root/<category>/image_anno.csv`` is there too, ``defect_types`` holds each test image's
    defect label from it (for the per-defect-type metrics of ``ckaad-fast eval``).
    """

    COLUMNS = ("object", "split", "label", "image", "mask")

    def __init__(
        self,
        root: PathLike,
        category: str,
        split: str = "train",
        image_size: SizeLike = 256,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        check: str = "verify",
        csv_path: PathLike | None = None,
        mask_resize: str = "nearest",
    ) -> None:
        super().__init__(image_size, mean, std, check)
        self.mask_resize = check_mask_resize(mask_resize)
        self.root = os.fspath(root)
        self.category = category
        self.split = split
        csv_file = os.fspath(csv_path) if csv_path is not None else os.path.join(self.root, "split_csv", "1cls.csv")
        layout = (
            "expected VisA layout root/split_csv/1cls.csv with columns object,split,label,image,mask "
            "(label normal/anomaly, paths relative to root)"
        )
        if not os.path.isfile(csv_file):
            raise ValueError(f"VisA split file {csv_file!r} not found: {layout}; {describe(self.root)}")
        with open(csv_file, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in self.COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{csv_file!r} lacks columns {missing}: {layout}; found columns {header}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
        objects = sorted({r["object"] for r in rows})
        if category not in objects:
            raise ValueError(f"category {category!r} not in {csv_file!r}: {layout}; found objects {objects}")
        rows = [r for r in rows if r["object"] == category]
        splits = sorted({r["split"] for r in rows})
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise ValueError(
                f"no rows for category {category!r} and split {split!r} in {csv_file!r}; splits found: {splits}"
            )

        items: list[tuple[str, int, str | None]] = []
        for r in rows:
            lab = r["label"].lower()
            if lab not in ("normal", "anomaly"):
                raise ValueError(
                    f"{csv_file!r}: label must be 'normal' or 'anomaly', got {r['label']!r} (image {r['image']!r})"
                )
            path = os.path.join(self.root, r["image"])
            if not os.path.isfile(path):
                warn_skip(path, "file listed in the split csv does not exist")
                self.skipped.append(path)
                continue
            mpath = None
            if lab == "anomaly":
                mpath = os.path.join(self.root, r["mask"]) if r["mask"] else None
                if mpath is None or not os.path.isfile(mpath):
                    warn_skip(path, f"its mask {r['mask']!r} is missing")
                    self.skipped.append(path)
                    continue
            items.append((path, int(lab == "anomaly"), mpath))
        items.sort(key=lambda it: it[0])
        kept = [it for it in items if self._keep(it[0], it[2])]
        if not kept:
            raise ValueError(
                f"no readable images for VisA category {category!r}, split {split!r} "
                f"({len(self.skipped)} skipped: {self.skipped[:5]})"
            )
        self.paths = [it[0] for it in kept]
        self.labels = [it[1] for it in kept]
        self.mask_paths = [it[2] for it in kept]
        #: Each item's defect type ("good" for normal ones) from VisA's ``<category>/image_anno.csv``
        #: (its ``label`` column, e.g. "chunk of wax missing"), or None without that file.
        self.defect_types = _visa_defect_types(self.root, category, self.paths, self.labels)

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        image = self._load(path)
        mask = load_mask(self.mask_paths[idx], self.image_size or tuple(image.shape[-2:]), self.mask_resize)
        return image, self.labels[idx], mask, path


def _visa_defect_types(root: str, category: str, paths: list[str], labels: list[int]) -> list[str] | None:
    table = os.path.join(root, category, "image_anno.csv")
    if not os.path.isfile(table):
        return None
    with open(table, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"image", "label"} <= {h.strip() for h in (reader.fieldnames or [])}:
            return None
        kind = {os.path.normpath(os.path.join(root, (r.get("image") or "").strip())): (r.get("label") or "").strip()
                for r in reader}
    return ["good" if lab == 0 else (kind.get(os.path.normpath(p)) or "anomaly") for p, lab in zip(paths, labels)]


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
