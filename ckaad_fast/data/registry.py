"""The data-set layouts, in one table: name -> how to read it, its domain, whether its classes
are labelled (the medical protocol), and the authors' per-data-set settings.

:func:`~.open.open_dataset`, ``ckaad-fast``'s ``--layout`` choices, training's defaults
(:func:`ckaad_fast.training.resolve_config`) and the experiments' table rules all read
:data:`LAYOUT_TABLE`; to add a layout, add a row here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .br35h import Br35HDataset
from .folder import FolderDataset
from .isic2018 import ISIC2018Dataset
from .mvtec import MVTecDataset
from .visa import VisADataset

__all__ = ["Layout", "LAYOUT_TABLE", "LAYOUTS", "DEFAULT_LAYOUT", "layout_spec"]


@dataclass(frozen=True)
class Layout:
    """One way a data set is laid out on disk.

    ``read(root, split, image_size, mean, std, category, normal_class, anomaly_classes,
    mask_resize)`` opens a split; ``domain`` is "industrial" (per-category models, pixel masks) or
    "medical" (one normal class against anomaly classes), the keys of training's
    ``DOMAIN_DEFAULTS``; ``class_labelled``: its
    anomalies come in labelled classes (the medical protocol: a validation split, k-class draws);
    ``needs_category``: a category (MVTec's folder, VisA's object) must be named;
    ``fixed_classes``: the data set fixes its normal class (no ``normal_class``);
    ``defaults``: the authors' training settings for it (epochs, batch size, image score).
    """

    name: str
    read: Callable[..., Any]
    domain: str
    class_labelled: bool
    needs_category: bool = False
    fixed_classes: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)


def _mvtec(root, split, image_size, mean, std, category, normal_class, anomaly_classes, mask_resize):
    return MVTecDataset(root, category, split, image_size, mean, std, mask_resize=mask_resize)


def _visa(root, split, image_size, mean, std, category, normal_class, anomaly_classes, mask_resize):
    return VisADataset(root, category, split, image_size, mean, std, mask_resize=mask_resize)


def _folder(root, split, image_size, mean, std, category, normal_class, anomaly_classes, mask_resize):
    return FolderDataset(root, normal_class, anomaly_classes, split, image_size, mean, std)


def _isic(root, split, image_size, mean, std, category, normal_class, anomaly_classes, mask_resize):
    return ISIC2018Dataset(root, split, image_size, mean, std, anomaly_classes=anomaly_classes)


def _br35h(root, split, image_size, mean, std, category, normal_class, anomaly_classes, mask_resize):
    return Br35HDataset(root, split, image_size, mean, std)


# The settings are the authors' training scripts': MVTec 200 epochs at batch 16, VisA 400; class
# folders (Chest X-ray, OCT) batch 32, ISIC and Br35H batch 64; ISIC's image score is the whole
# map's mean.
LAYOUT_TABLE: dict[str, Layout] = {
    "mvtec": Layout("mvtec", _mvtec, "industrial", False, needs_category=True,
                    defaults={"epochs": 200, "batch_size": 16}),
    "visa": Layout("visa", _visa, "industrial", False, needs_category=True,
                   defaults={"epochs": 400, "batch_size": 16}),
    "folder": Layout("folder", _folder, "medical", True, defaults={"epochs": 200, "batch_size": 32}),
    "isic2018": Layout("isic2018", _isic, "medical", True, fixed_classes=True,
                       defaults={"epochs": 200, "batch_size": 64, "topk": None}),
    "br35h": Layout("br35h", _br35h, "medical", True, fixed_classes=True,
                    defaults={"epochs": 200, "batch_size": 64}),
}
#: Layout names, in the table's order.
LAYOUTS = tuple(LAYOUT_TABLE)
#: The layout a command reads unless told which.
DEFAULT_LAYOUT = "mvtec"


def layout_spec(name: str) -> Layout:
    """The row of ``name``; a ValueError naming the choices for an unknown one."""
    try:
        return LAYOUT_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"layout must be one of {LAYOUTS}, got {name!r}") from None
