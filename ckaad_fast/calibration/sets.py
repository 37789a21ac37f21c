"""Calibration sets: which splits a threshold may come from, a folder of normal images as a set,
and the share of the training images held out to calibrate on (:func:`split_for_calibration`)."""
from __future__ import annotations

import numpy as np
from torch.utils.data import ConcatDataset, Subset

from ..errors import ArgumentError
from .thresholds import TARGET_FPR, normal_images_needed

__all__ = ["CALIBRATE_SHARE", "CALIBRATION_SPLIT", "check_calibration_split", "NormalItems", "normal_folder_set", "split_for_calibration"]

#: The share of the training images (normal ones, and coarse anomalies where there are any) held
#: out to calibrate on when training calibrates (``train --calibrate``, :func:`ckaad_fast.pipeline.fit`).
CALIBRATE_SHARE = 0.1
#: The split of a data set a calibration reads unless told which.
CALIBRATION_SPLIT = "val"


def check_calibration_split(split: str | None, layout: str, allow_training_images: bool = False) -> str:
    """Refuse, before anything is scored, a split a threshold must never come from: the test
    split (the numbers it is judged by) and the training split (images the model has learnt:
    their scores are lower than fresh ones', so a 5% target flagged 33% of fresh normal images in
    one run) unless ``allow_training_images`` (an explicit override, recorded in the
    calibration), and say what to do instead. The layouts hold only those two splits. Returns the
    split (None: :data:`CALIBRATION_SPLIT`)."""
    split = CALIBRATION_SPLIT if split is None else split
    hint = ("hold normal images out of training and pass --normal DIR, or train with --calibrate, which holds "
            "them out for you")
    if split == "test":
        raise ArgumentError("split", f"never calibrate on the test split: {hint}")
    if split == "train":
        if allow_training_images:
            return split
        raise ArgumentError("split", f"the training split holds the images the model learnt from, whose scores "
                                     f"are lower than fresh ones' (the threshold would flag far more than its "
                                     f"target): {hint} (or, knowing this, --allow-training-images, which the "
                                     f"calibration records)")
    raise ArgumentError("split", f"layout {layout!r} has no {split!r} split (only train and test): {hint}")


class NormalItems:
    """The items of an image folder as normal ones: ``(image, 0, path)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, _, path = self.dataset[i]
        return image, 0, path


def normal_folder_set(folder, image_size, mean, std):
    """A calibration set of the images in ``folder`` (searched recursively), all normal: the
    good parts a production line holds aside to set its false-positive rate."""
    from ..data import AnomalyFolderDataset

    try:
        return NormalItems(AnomalyFolderDataset(folder, image_size, mean, std))
    except ValueError as e:
        raise ArgumentError("normal", str(e)) from None


class _Part(Subset):
    """Some items of a data set, keeping the attributes training reads (normalisation, paths)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        for name in ("mean", "std", "image_size"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))
        if hasattr(dataset, "paths"):
            self.paths = [dataset.paths[i] for i in self.indices]


class _Labelled:
    """``(image, label, path)`` items of any of the library's data sets, all with one label."""

    def __init__(self, dataset, label: int):
        self.dataset, self.label = dataset, label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item[0], self.label, item[-1] if isinstance(item[-1], str) else ""


def split_for_calibration(train_set, anomaly_set=None, share: float = CALIBRATE_SHARE, seed: int = 0,
                          target_fpr: float = TARGET_FPR):
    """Hold out ``share`` of the normal training images (and of the coarse anomalies, when there
    are any) for calibration, drawn with ``seed``: ``(train_set, anomaly_set, calibration_set)``,
    the first two to train on, the last never seen in training (its items ``(image, label, path)``).
    A held-out set that could not be calibrated on (normal images only, fewer than
    ``1 / target_fpr``) is refused here, before any training."""
    if not (isinstance(share, (int, float)) and 0 < share < 1):
        raise ArgumentError("calibrate_share", f"must lie in (0, 1), got {share!r}")
    rng = np.random.default_rng(seed)

    def split(ds):
        n = len(ds)
        k = max(1, int(round(share * n)))  # at least one image of each kind to calibrate on
        if k >= n:
            raise ArgumentError("calibrate_share", f"{share:g} of {n} images leaves nothing to train on or to "
                                                   f"calibrate with")
        held = set(rng.permutation(n)[:k].tolist())
        return _Part(ds, [i for i in range(n) if i not in held]), _Part(ds, sorted(held))

    train_kept, normal_held = split(train_set)
    parts = [_Labelled(normal_held, 0)]
    anomalies_kept = anomaly_set
    if anomaly_set is not None and len(anomaly_set) > 1:
        anomalies_kept, anomalies_held = split(anomaly_set)
        parts.append(_Labelled(anomalies_held, 1))
    need = normal_images_needed(target_fpr)
    if len(parts) == 1 and len(normal_held) < need:
        raise ArgumentError("calibrate_share", f"holds out {len(normal_held)} normal images and no anomalies; a "
                                               f"{100 * target_fpr:g}% false-positive rate needs at least {need}: "
                                               "raise the share or the rate, or give labelled anomalies")
    return train_kept, anomalies_kept, ConcatDataset(parts)
