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
from ..lazy import exports

# Each public name, and the submodule that owns it: imported on first use, so that finding image
# files (.files) needs no torch (the deployment path has none).
__getattr__, __dir__, __all__ = exports(__name__, {
    "AnomalyFolderDataset": "anomalies", "CoarseAnomalies": "anomalies", "PseudoAnomalyDataset": "anomalies",
    "coarse_anomaly_set": "anomalies", "sample_coarse_anomalies": "anomalies",
    "IMAGE_EXTENSIONS": "files", "CorruptImageWarning": "files", "check_image": "files", "is_image_file": "files",
    "list_images": "files",
    "MAX_UPSCALE": "images", "ImageRejected": "images", "decode_image": "images", "load_image": "images",
    "load_mask": "images", "minimum_source_size": "images",
    "ImageFileDataset": "base",
    "Br35HDataset": "br35h",
    "FolderDataset": "folder",
    "ISIC2018Dataset": "isic2018",
    "MVTecDataset": "mvtec",
    "VisADataset": "visa",
    "list_categories": "open", "open_dataset": "open",
    "LAYOUT_TABLE": "registry", "LAYOUTS": "registry", "Layout": "registry", "layout_spec": "registry",
    "VALIDATION_SHARE": "splits", "carve_validation": "splits",
})
