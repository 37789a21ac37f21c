"""Data for CKAAD: image files, the data-set layouts, the coarse anomaly set, synthetic data.

Everything here reads local files only; nothing ever touches the network.

- :mod:`.files`: finding image files, checking they can be read.
- :mod:`.images`: reading images and masks as tensors (one rule for training and scoring).
- one file per data-set layout, as anomalib lays them out: :mod:`.mvtec` (MVTec AD), :mod:`.visa`,
  :mod:`.folder` (class folders), :mod:`.isic2018` and :mod:`.br35h` (as their users download
  them), on :mod:`.base` (the image-file data set every layout is); :mod:`.registry`: the table of
  layouts (reader, domain, labelled classes, the authors' settings); :mod:`.open`: any of them by
  layout name.
- :mod:`.splits`: the validation split the medical protocol holds out of the training set.
- :mod:`.anomalies`: the coarse anomaly set (the paper's protocols) and pseudo-anomalies.
- :mod:`.synthetic`: a realistic anomaly data set with exact masks, made offline (the demo's).
"""
from .anomalies import (
    AnomalyFolderDataset,
    CoarseAnomalies,
    PseudoAnomalyDataset,
    coarse_anomaly_set,
    sample_coarse_anomalies,
)
from .files import IMAGE_EXTENSIONS, CorruptImageWarning, check_image, is_image_file, list_images
from .images import MAX_UPSCALE, ImageRejected, decode_image, load_image, load_mask, minimum_source_size
from .base import ImageFileDataset
from .br35h import Br35HDataset
from .folder import FolderDataset
from .isic2018 import ISIC2018Dataset
from .mvtec import MVTecDataset
from .visa import VisADataset
from .open import list_categories, open_dataset
from .registry import LAYOUT_TABLE, LAYOUTS, Layout, layout_spec
from .splits import VALIDATION_SHARE, carve_validation

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_UPSCALE",
    "ImageRejected",
    "minimum_source_size",
    "LAYOUTS",
    "LAYOUT_TABLE",
    "Layout",
    "layout_spec",
    "VALIDATION_SHARE",
    "AnomalyFolderDataset",
    "Br35HDataset",
    "ISIC2018Dataset",
    "CoarseAnomalies",
    "CorruptImageWarning",
    "FolderDataset",
    "ImageFileDataset",
    "MVTecDataset",
    "PseudoAnomalyDataset",
    "VisADataset",
    "carve_validation",
    "check_image",
    "coarse_anomaly_set",
    "decode_image",
    "is_image_file",
    "list_images",
    "load_image",
    "list_categories",
    "load_mask",
    "open_dataset",
    "sample_coarse_anomalies",
]
