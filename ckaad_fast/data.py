"""Data sets for CKAAD: normal training images, test sets with masks, and the coarse anomaly set.

Everything here reads local files only; nothing ever touches the network.

Item formats (the image always comes first, the label second and the file path last, so a
training loop can take ``batch[0]`` from any of them):

========================  =====================================================================
data set                  item
========================  =====================================================================
:class:`MVTecDataset`     ``(image (3,H,W) float32, label int 0/1, mask (1,H,W) float32 0/1, path)``
:class:`VisADataset`      same as MVTec
:class:`FolderDataset`    ``(image, label, path)``; class-folder data has no masks
:class:`AnomalyFolderDataset`  ``(image, 1, path)``; image-level labels only
:class:`PseudoAnomalyDataset`  ``(distorted image, 1, path of the normal image it came from)``
========================  =====================================================================

Images are resized with PIL's bilinear filter (as the reference code does), converted to float in
[0, 1] and normalised with ImageNet's mean and std unless other ``mean``/``std`` are given
(``mean=None`` leaves them in [0, 1]). Masks are resized with nearest neighbour and binarised
(any non-zero pixel is anomalous).

Robustness: every data set checks its files when it indexes them (``PIL.Image.verify``, which is
cheap; ``check="load"`` fully decodes each file instead, ``check="none"`` skips the check). A file
that fails is left out with a :class:`CorruptImageWarning` naming it, and its path is appended to
the data set's ``skipped`` list, so that ``__getitem__`` does not fail in the middle of an epoch.
A missing, empty or wrongly laid out folder raises :class:`ValueError` saying which layout was
expected and what was found. File order is sorted and deterministic.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageWarning",
    "is_image_file",
    "list_images",
    "check_image",
    "load_image",
    "load_mask",
    "MVTecDataset",
    "VisADataset",
    "FolderDataset",
    "AnomalyFolderDataset",
    "CoarseAnomalies",
    "sample_coarse_anomalies",
    "PseudoAnomalyDataset",
]

PathLike = Union[str, os.PathLike]
SizeLike = Union[int, Sequence[int]]

#: File extensions recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CHECK_MODES = ("verify", "load", "none")


class CorruptImageWarning(UserWarning):
    """An image (or mask) could not be read and was left out of a data set."""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def is_image_file(path: PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    # Dot files include macOS' "._x.png" resource forks, which are not images.
    return name.startswith(".")


def _images_in_dir(directory: str, recursive: bool) -> list[str]:
    found: list[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            found.extend(
                os.path.join(dirpath, f) for f in filenames if not _is_hidden(f) and is_image_file(f)
            )
    else:
        with os.scandir(directory) as entries:
            found.extend(
                e.path
                for e in entries
                if not _is_hidden(e.name) and is_image_file(e.name) and e.is_file()
            )
    return sorted(found)


def list_images(path_or_paths: PathLike | Iterable[PathLike], recursive: bool = True) -> list[str]:
    """Sorted list of image files named by a folder, a file, or a list of folders and files.

    Folders are searched (recursively unless ``recursive=False``) for files with one of
    :data:`IMAGE_EXTENSIONS`; hidden files and folders (names starting with ``.``) are ignored.
    Files named directly must exist and have an image extension. The result is de-duplicated and
    sorted, so it is the same on every call.

    Raises:
        ValueError: a path does not exist, a folder holds no image, a named file is not an image,
            or nothing was given.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        items = [path_or_paths]
    else:
        items = list(path_or_paths)
    if not items:
        raise ValueError("list_images: no path given")
    out: set[str] = set()
    for item in items:
        p = os.fspath(item)
        if os.path.isdir(p):
            imgs = _images_in_dir(p, recursive)
            if not imgs:
                raise ValueError(
                    f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in folder {p!r}"
                    + ("" if recursive else " (not searching sub-folders)")
                )
            out.update(imgs)
        elif os.path.isfile(p):
            if not is_image_file(p):
                raise ValueError(
                    f"{p!r} is not an image file: expected one of {', '.join(IMAGE_EXTENSIONS)}"
                )
            out.add(p)
        else:
            raise ValueError(f"path does not exist: {p!r}")
    return sorted(out)


def check_image(path: PathLike, full: bool = False) -> str | None:
    """Return ``None`` when PIL can read ``path``, otherwise a short description of the error.

    ``full=False`` runs ``Image.verify()`` (reads the header and, for PNG, checks the chunk CRCs
    without decoding); ``full=True`` also decodes the pixels, which also catches truncated JPEGs.
    """
    try:
        with Image.open(path) as im:
            im.verify()
        if full:
            with Image.open(path) as im:
                im.load()
    except Exception as e:  # noqa: BLE001 - any failure to read means "skip this file"
        return f"{type(e).__name__}: {e}"
    return None


def _check_mode(check: str) -> str:
    if check not in _CHECK_MODES:
        raise ValueError(f"check must be one of {_CHECK_MODES}, got {check!r}")
    return check


def _readable(path: str, check: str) -> str | None:
    if check == "none":
        return None
    return check_image(path, full=(check == "load"))


def _warn_skip(path: str, reason: str) -> None:
    warnings.warn(f"skipping unreadable image {path!r}: {reason}", CorruptImageWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------------------------


def _size_hw(image_size: SizeLike) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _norm_stats(mean, std) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither (mean=None, std=None: no normalisation)")
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def _to_rgb_float01(im: Image.Image, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize (bilinear) and convert any PIL image to an (H, W, 3) float32 array in [0, 1]."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale (common for medical scans): scale to [0, 1] without clipping to
        # 8 bits first, which convert("RGB") would do.
        arr = np.asarray(im, dtype=np.float32)
        if mode == "F":
            peak = float(arr.max()) if arr.size else 1.0
            scale = 1.0 if peak <= 1.0 else peak
        else:
            scale = 65535.0 if (mode.startswith("I;16") or (arr.size and arr.max() > 255)) else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        f = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
        if f.size != size_wh:
            f = f.resize(size_wh, Image.BILINEAR)
        g = np.asarray(f, dtype=np.float32)
        return np.repeat(g[:, :, None], 3, axis=2)
    rgb = im.convert("RGB")
    if rgb.size != size_wh:
        rgb = rgb.resize(size_wh, Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def load_image(
    path: PathLike | Image.Image,
    image_size: SizeLike = 256,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> torch.Tensor:
    """Read an image as a normalised ``(3, H, W)`` float32 tensor.

    The image (a path or a PIL image) is converted to RGB (grayscale is repeated over the three
    channels, 16-bit images are scaled by 65535), resized to ``image_size`` (an int, or
    ``(height, width)``) with PIL's bilinear filter, scaled to [0, 1] and normalised as
    ``(x - mean) / std`` per channel. ``mean=None, std=None`` skips the normalisation.
    """
    h, w = _size_hw(image_size)
    mean, std = _norm_stats(mean, std)
    if isinstance(path, Image.Image):
        arr = _to_rgb_float01(path, (w, h))
    else:
        with Image.open(path) as im:
            arr = _to_rgb_float01(im, (w, h))
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if mean is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        x = (x - m) / s
    return x


def load_mask(path: PathLike | None, image_size: SizeLike = 256) -> torch.Tensor:
    """Read a ground-truth mask as a ``(1, H, W)`` float32 tensor of 0s and 1s.

    Any non-zero pixel (in any channel) is anomalous; the mask is resized with nearest neighbour.
    ``path=None`` gives an all-zero mask (a normal image).
    """
    h, w = _size_hw(image_size)
    if path is None:
        return torch.zeros(1, h, w)
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    binary = Image.fromarray((arr > 0).astype(np.uint8) * 255)
    if binary.size != (w, h):
        binary = binary.resize((w, h), Image.NEAREST)
    m = np.asarray(binary) > 127
    return torch.from_numpy(m.astype(np.float32))[None]


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


class _ImageDataset(Dataset):
    """Shared parts: transform parameters, the corrupt-file filter, and image loading."""

    def __init__(self, image_size: SizeLike, mean, std, check: str) -> None:
        self.image_size = _size_hw(image_size)
        self.mean, self.std = _norm_stats(mean, std)
        self.check = _check_mode(check)
        self.skipped: list[str] = []
        self.paths: list[str] = []
        self.labels: list[int] = []

    def _keep(self, path: str, mask_path: str | None = None) -> bool:
        """Check one image (and its mask); warn, record and return False when unreadable."""
        reason = _readable(path, self.check)
        if reason is None and mask_path is not None:
            mr = _readable(mask_path, self.check)
            if mr is not None:
                reason = f"its mask {mask_path!r} is unreadable ({mr})"
        if reason is not None:
            _warn_skip(path, reason)
            self.skipped.append(path)
            return False
        return True

    def _load(self, path: str) -> torch.Tensor:
        try:
            return load_image(path, self.image_size, self.mean, self.std)
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


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not _is_hidden(e.name))
    except OSError:
        return []


def _describe(path: str) -> str:
    if not os.path.exists(path):
        return f"{path!r} does not exist"
    if not os.path.isdir(path):
        return f"{path!r} is not a folder"
    subs = _subdirs(path)
    n_img = len(_images_in_dir(path, recursive=False))
    return f"{path!r} holds sub-folders {subs} and {n_img} image file(s)"


def _find_mask(gt_dir: str, stem: str) -> str | None:
    for name in (stem + "_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = os.path.join(gt_dir, name + e)
                if os.path.isfile(p):
                    return p
    return None


class MVTecDataset(_ImageDataset):
    """One category of MVTec AD (or any data set laid out the same way).

    Expected layout::

        root/<category>/train/good/*.png                  normal training images
        root/<category>/test/good/*.png                   normal test images
        root/<category>/test/<defect>/*.png               anomalous test images
        root/<category>/ground_truth/<defect>/<name>_mask.png   their masks

    (``<name>.png`` is also accepted as a mask name, and any of :data:`IMAGE_EXTENSIONS` for both.)

    Items are ``(image (3,H,W), label, mask (1,H,W), path)`` with label 0 for ``good`` and 1
    otherwise; masks of normal images are zeros. ``split="train"`` yields only the normal images
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
    ) -> None:
        super().__init__(image_size, mean, std, check)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
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
                f"MVTec category {category!r} not found: {layout}; {_describe(self.root)}"
            )
        split_dir = os.path.join(cat_dir, split)
        if not os.path.isdir(split_dir):
            raise ValueError(f"no {split!r} folder for category {category!r}: {layout}; {_describe(cat_dir)}")

        items: list[tuple[str, int, str | None, str]] = []  # path, label, mask path, defect type
        if split == "train":
            good = os.path.join(split_dir, "good")
            if not os.path.isdir(good):
                raise ValueError(f"no train/good folder: {layout}; {_describe(split_dir)}")
            imgs = _images_in_dir(good, recursive=False)
            if not imgs:
                raise ValueError(f"no images in {good!r}: {layout}; {_describe(good)}")
            items = [(p, 0, None, "good") for p in imgs]
        else:
            defects = _subdirs(split_dir)
            if not defects:
                raise ValueError(f"no class folders in {split_dir!r}: {layout}; {_describe(split_dir)}")
            gt_root = os.path.join(cat_dir, "ground_truth")
            for defect in defects:
                d = os.path.join(split_dir, defect)
                imgs = _images_in_dir(d, recursive=False)
                if defect == "good":
                    items.extend((p, 0, None, "good") for p in imgs)
                    continue
                gt_dir = os.path.join(gt_root, defect)
                if imgs and not os.path.isdir(gt_dir):
                    raise ValueError(
                        f"no mask folder {gt_dir!r} for defect type {defect!r}: {layout}; "
                        f"{_describe(gt_root)}"
                    )
                for p in imgs:
                    stem = os.path.splitext(os.path.basename(p))[0]
                    mp = _find_mask(gt_dir, stem)
                    if mp is None:
                        _warn_skip(p, f"no mask {stem}_mask.png in {gt_dir!r}")
                        self.skipped.append(p)
                        continue
                    items.append((p, 1, mp, defect))
            if not items and not self.skipped:
                raise ValueError(f"no images under {split_dir!r}: {layout}; {_describe(split_dir)}")

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
        mask = load_mask(self.mask_paths[idx], self.image_size)
        return image, self.labels[idx], mask, path


class VisADataset(_ImageDataset):
    """One category of VisA, read through its split file.

    Expected layout: ``root/split_csv/1cls.csv`` (or ``csv_path``) with the header
    ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly``; ``image`` and
    ``mask`` are paths relative to ``root`` (``mask`` is empty for normal images). Items are
    ``(image, label, mask, path)`` as for :class:`MVTecDataset`. ``split`` is matched against the
    csv's ``split`` column (``train`` or ``test`` in VisA's 1cls split).
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
    ) -> None:
        super().__init__(image_size, mean, std, check)
        self.root = os.fspath(root)
        self.category = category
        self.split = split
        csv_file = os.fspath(csv_path) if csv_path is not None else os.path.join(self.root, "split_csv", "1cls.csv")
        layout = (
            "expected VisA layout root/split_csv/1cls.csv with columns object,split,label,image,mask "
            "(label normal/anomaly, paths relative to root)"
        )
        if not os.path.isfile(csv_file):
            raise ValueError(f"VisA split file {csv_file!r} not found: {layout}; {_describe(self.root)}")
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
                _warn_skip(path, "file listed in the split csv does not exist")
                self.skipped.append(path)
                continue
            mpath = None
            if lab == "anomaly":
                mpath = os.path.join(self.root, r["mask"]) if r["mask"] else None
                if mpath is None or not os.path.isfile(mpath):
                    _warn_skip(path, f"its mask {r['mask']!r} is missing")
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

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        return self._load(path), self.labels[idx], load_mask(self.mask_paths[idx], self.image_size), path


class FolderDataset(_ImageDataset):
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
        classes = _subdirs(split_dir)
        if not classes:
            where = split_dir if os.path.isdir(split_dir) else self.root
            raise ValueError(f"no class folders for split {split!r}: {layout}; {_describe(where)}")
        if normal_class not in classes:
            raise ValueError(
                f"normal class folder {normal_class!r} not found in {split_dir!r}: {layout}; found classes {classes}"
            )
        others = [c for c in classes if c != normal_class]
        if anomaly_classes is None:
            anomaly_classes = others
        else:
            anomaly_classes = [anomaly_classes] if isinstance(anomaly_classes, str) else list(anomaly_classes)
            bad = [c for c in anomaly_classes if c not in others]
            if bad:
                raise ValueError(
                    f"anomaly classes {bad} not found in {split_dir!r} (or equal to the normal class); "
                    f"found classes {classes}"
                )
        self.anomaly_classes = list(anomaly_classes)
        self.paths_by_class: dict[str, list[str]] = {
            c: _images_in_dir(os.path.join(split_dir, c), recursive=True) for c in classes
        }
        if not self.paths_by_class[normal_class]:
            raise ValueError(f"no images in normal class folder {os.path.join(split_dir, normal_class)!r}: {layout}")
        served = [normal_class] if split == "train" else [normal_class, *self.anomaly_classes]
        items = [(p, int(c != normal_class), c) for c in served for p in self.paths_by_class[c]]
        items.sort(key=lambda it: it[0])
        kept = [it for it in items if self._keep(it[0])]
        if not kept:
            raise ValueError(f"no readable images in {split_dir!r} for classes {served} ({len(self.skipped)} skipped)")
        self.paths = [it[0] for it in kept]
        self.labels = [it[1] for it in kept]
        self.classes = [it[2] for it in kept]

    @property
    def num_normal(self) -> int:
        return sum(1 for lab in self.labels if lab == 0)

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        return self._load(path), self.labels[idx], path


@dataclass(frozen=True)
class CoarseAnomalies:
    """Result of :func:`sample_coarse_anomalies`: the labelled anomalies and how they were drawn."""

    paths: tuple[str, ...]
    path_classes: tuple[str, ...]
    classes: tuple[str, ...]
    num_normal: int
    ratio_labeled: float
    seed: int | None = None
    requested: int = field(default=0)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return iter(self.paths)


def sample_coarse_anomalies(
    source: FolderDataset | Mapping[str, Sequence[PathLike]],
    ratio_labeled: float,
    num_classes: int = 1,
    seed: int | None = 0,
    *,
    classes: Sequence[str] | None = None,
    normal_class: str | None = None,
    num_normal: int | None = None,
) -> CoarseAnomalies:
    """Draw the coarse anomaly set from class-labelled training images, as the paper's experiments do.

    The protocol (paper, "Experimental Scenarios"; the reference code's data loader):

    1. Choose ``k = num_classes`` anomaly classes at random among the classes other than the
       normal one (or take ``classes`` as given; it then overrides ``num_classes``; the paper's
       ``k = 1`` tables run once per anomaly class this way and average).
    2. Draw ``round(n_normal * r_l / (1 - r_l))`` images at random from the pooled images of those
       classes, so that the labelled anomalies make up the fraction ``r_l = ratio_labeled`` of the
       training set (normal images plus labelled anomalies). If the pool is smaller, all of it is
       taken, with a warning.

    ``source`` is a :class:`FolderDataset` of the training split (its ``paths_by_class``, normal
    class, anomaly classes and number of normal images are used) or a mapping from class name to
    image paths, which then needs ``normal_class`` (a key of the mapping, whose length gives
    ``n_normal``) or ``num_normal``. The draw uses ``numpy.random.default_rng(seed)`` and sorted
    inputs, so a seed always gives the same set. The returned paths are sorted.
    """
    if not 0.0 <= float(ratio_labeled) < 1.0:
        raise ValueError(f"ratio_labeled (r_l) must be in [0, 1), got {ratio_labeled}")
    if isinstance(source, FolderDataset):
        by_class = {c: sorted(os.fspath(p) for p in ps) for c, ps in source.paths_by_class.items()}
        normal = source.normal_class
        candidates = sorted(source.anomaly_classes)
        n_norm = source.num_normal if num_normal is None else int(num_normal)
    elif isinstance(source, Mapping):
        by_class = {str(c): sorted(os.fspath(p) for p in ps) for c, ps in source.items()}
        normal = normal_class
        if num_normal is not None:
            n_norm = int(num_normal)
        elif normal is not None and normal in by_class:
            n_norm = len(by_class[normal])
        else:
            raise ValueError(
                "with a mapping of class -> paths, give normal_class (a key of the mapping) or num_normal; "
                f"classes found: {sorted(by_class)}"
            )
        candidates = sorted(c for c in by_class if c != normal)
    else:
        raise TypeError(f"source must be a FolderDataset or a mapping class -> paths, got {type(source).__name__}")
    if n_norm < 0:
        raise ValueError(f"num_normal must be >= 0, got {n_norm}")
    if not candidates:
        raise ValueError(f"no anomaly classes to draw from (classes: {sorted(by_class)}, normal: {normal!r})")

    rng = np.random.default_rng(seed)
    if classes is not None:
        chosen = [classes] if isinstance(classes, str) else list(classes)
        bad = [c for c in chosen if c not in candidates]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"classes must be distinct anomaly classes among {candidates}, got {chosen}")
    else:
        k = int(num_classes)
        if not 1 <= k <= len(candidates):
            raise ValueError(
                f"num_classes (k) must be between 1 and {len(candidates)} (the anomaly classes {candidates}), "
                f"got {num_classes}"
            )
        chosen = [candidates[i] for i in rng.permutation(len(candidates))[:k]]

    pool = [(p, c) for c in chosen for p in by_class[c]]
    requested = int(round(n_norm * float(ratio_labeled) / (1.0 - float(ratio_labeled))))
    if requested > len(pool):
        warnings.warn(
            f"r_l={ratio_labeled} asks for {requested} labelled anomalies but classes {chosen} hold only "
            f"{len(pool)} images; taking all of them",
            stacklevel=2,
        )
    take = min(requested, len(pool))
    picked = sorted(pool[i] for i in rng.permutation(len(pool))[:take]) if take else []
    return CoarseAnomalies(
        paths=tuple(p for p, _ in picked),
        path_classes=tuple(c for _, c in picked),
        classes=tuple(chosen),
        num_normal=n_norm,
        ratio_labeled=float(ratio_labeled),
        seed=seed,
        requested=requested,
    )


class AnomalyFolderDataset(_ImageDataset):
    """The coarse anomaly set: anomalous images known only to be anomalous (no masks).

    ``source`` is a folder (searched recursively), an image file, a list of folders/files, or a
    :class:`CoarseAnomalies` returned by :func:`sample_coarse_anomalies`. Items are
    ``(image, 1, path)``.
    """

    def __init__(
        self,
        source: PathLike | Iterable[PathLike] | CoarseAnomalies,
        image_size: SizeLike = 256,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        check: str = "verify",
    ) -> None:
        super().__init__(image_size, mean, std, check)
        if isinstance(source, CoarseAnomalies):
            if len(source) == 0:
                raise ValueError(
                    f"the coarse anomaly sample is empty (r_l={source.ratio_labeled}, "
                    f"{source.num_normal} normal images)"
                )
            source = list(source.paths)
        paths = list_images(source)
        kept = [p for p in paths if self._keep(p)]
        if not kept:
            raise ValueError(f"no readable anomaly images in {source!r} ({len(self.skipped)} skipped)")
        self.paths = kept
        self.labels = [1] * len(kept)

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        return self._load(path), 1, path


class PseudoAnomalyDataset(Dataset):
    """Pseudo-anomalies for industrial data: elastic distortions of normal training images.

    Each item of ``normal_dataset`` (whose item's first element is the image tensor and last the
    path) is distorted with ``torchvision.transforms.v2.ElasticTransform(alpha, sigma)``; the
    reference code uses ``alpha=200`` and torchvision's default ``sigma=5``. Pixels pulled in from
    outside the image are black (0 before normalisation, as the reference's PIL input gets), which
    is computed from the normal data set's ``mean``/``std`` when it has them.

    The distortion of item ``i`` is drawn from a generator seeded with ``(seed, epoch, i)``, so it
    is reproducible; call :meth:`set_epoch` to draw new distortions each epoch. Items are
    ``(distorted image, 1, path of the source image)``.
    """

    def __init__(
        self,
        normal_dataset: Dataset,
        alpha: float = 200.0,
        sigma: float = 5.0,
        seed: int = 0,
        fill: float | Sequence[float] | None = None,
    ) -> None:
        from torchvision.transforms import v2

        if len(normal_dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("PseudoAnomalyDataset needs a non-empty normal data set")
        self.normal_dataset = normal_dataset
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.epoch = 0
        if fill is None:
            mean = getattr(normal_dataset, "mean", None)
            std = getattr(normal_dataset, "std", None)
            fill = [-m / s for m, s in zip(mean, std)] if mean is not None and std is not None else 0.0
        self.fill = fill
        self.transform = v2.ElasticTransform(alpha=self.alpha, sigma=self.sigma, fill=fill)

    @property
    def skipped(self) -> list[str]:
        return list(getattr(self.normal_dataset, "skipped", []))

    @property
    def paths(self) -> list[str]:
        return list(getattr(self.normal_dataset, "paths", []))

    def set_epoch(self, epoch: int) -> None:
        """Change the distortions drawn (deterministically) for every item."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.normal_dataset)  # type: ignore[arg-type]

    def distort(self, image: torch.Tensor, idx: int) -> torch.Tensor:
        """The elastic distortion of ``image`` drawn for item ``idx`` at the current epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(idx)]).generate_state(1, np.uint64)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.transform(image)

    def __getitem__(self, idx: int):
        item = self.normal_dataset[idx]
        image = item[0]
        path = item[-1] if isinstance(item[-1], str) else ""
        return self.distort(image, idx), 1, path
