"""VisA's layout: ``ROOT/split_csv/1cls.csv`` and its image and mask paths."""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import describe, warn_skip
from .images import DEFAULT_MASK_RESIZE, SizeLike
from .base import MaskedImageDataset, PathLike

__all__ = ["VisADataset"]


class VisADataset(MaskedImageDataset):
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
        mask_resize: str = DEFAULT_MASK_RESIZE,
    ) -> None:
        super().__init__(root, category, split, image_size, mean, std, check, mask_resize)
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
        self._keep_all(items, "VisA")
        #: Each item's defect type ("good" for normal ones) from VisA's ``<category>/image_anno.csv``
        #: (its ``label`` column, e.g. "chunk of wax missing"), or None without that file.
        self.defect_types = _visa_defect_types(self.root, category, self.paths, self.labels)

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
