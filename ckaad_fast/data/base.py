"""The base of every image-file data set; each layout is one file beside it (:mod:`.mvtec`,
:mod:`.visa`, :mod:`.folder`, :mod:`.isic2018`, :mod:`.br35h`), registered in :mod:`.registry`.

Item formats (the image always comes first, the label second and the file path last, so a
training loop can take ``batch[0]`` from any of them):

========================  =====================================================================
data set                  item
========================  =====================================================================
:class:`.MVTecDataset`    ``(image (3,H,W) float32, label int 0/1, mask (1,H,W) float32 0/1, path)``
:class:`.VisADataset`     same as MVTec
:class:`.FolderDataset`   ``(image, label, path)``; class-folder data has no masks
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

import os
from typing import Union

import torch
from torch.utils.data import Dataset

from .files import check_mode, readable, warn_skip
from .images import ImageRejected, SizeLike, check_mask_resize, load_image, load_mask, norm_stats, size_hw

__all__ = ["ImageFileDataset", "MaskedImageDataset", "PathLike"]

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


class MaskedImageDataset(ImageFileDataset):
    """The base of the layouts with ground-truth masks (MVTec AD, VisA): items ``(image, label,
    mask, path)``, the mask resized by ``mask_resize`` to the image's size."""

    def __init__(self, root: PathLike, category: str, split: str, image_size: SizeLike, mean, std, check: str,
                 mask_resize: str) -> None:
        super().__init__(image_size, mean, std, check)
        self.mask_resize = check_mask_resize(mask_resize)
        self.root = os.fspath(root)
        self.category = category
        self.split = split
        self.mask_paths: list[str | None] = []

    def _keep_all(self, items: list[tuple], kind: str) -> list[tuple]:
        """The readable ``(path, label, mask path, ...)`` items, which become the data set's; a
        ValueError naming the ``kind`` of layout when none is."""
        kept = [it for it in items if self._keep(it[0], it[2])]
        if not kept:
            raise ValueError(f"no readable images for {kind} category {self.category!r}, split {self.split!r} "
                             f"({len(self.skipped)} skipped: {self.skipped[:5]})")
        self.paths = [it[0] for it in kept]
        self.labels = [it[1] for it in kept]
        self.mask_paths = [it[2] for it in kept]
        return kept

    def __getitem__(self, idx: int):
        path = self.paths[idx]
        image = self._load(path)
        mask = load_mask(self.mask_paths[idx], self.image_size or tuple(image.shape[-2:]), self.mask_resize)
        return image, self.labels[idx], mask, path
