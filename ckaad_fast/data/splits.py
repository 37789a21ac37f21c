"""The validation split the paper's medical protocol carves off a class-labelled training set.

The authors' code, before it draws any labelled anomaly, takes a validation set out of the
training split, normal and anomalous images alike, and never trains on it:

1. shuffle the normal images and (pooled over every other class) the anomalous ones;
2. ``v = min(int(n_normal * share), int(n_anomalous * share))`` with ``share = 0.05``;
3. the first ``v + 1`` of each shuffled list are the validation set (balanced: as many anomalous
   images as normal ones), the rest stays in the training split.

(The ``+ 1`` is the authors': it keeps one image of each kind even on a tiny set.) The labelled
anomalies of :func:`~.anomalies.sample_coarse_anomalies` are then drawn from what remains, so a
validation image is never a training image. :func:`carve_validation` does this with its own
seeded generator, so a seed always carves the same split.
"""
from __future__ import annotations

import copy

import numpy as np

from .folder import FolderDataset

__all__ = ["VALIDATION_SHARE", "carve_validation"]

#: The share of each kind of training image the authors hold out for validation.
VALIDATION_SHARE = 0.05


def carve_validation(train_set: FolderDataset, share: float = VALIDATION_SHARE,
                     seed: int = 0) -> tuple[FolderDataset, FolderDataset]:
    """``(training split without the validation images, validation set)`` of a class-labelled
    training split (:class:`FolderDataset` and the medical layouts), by the rule of the module.

    The returned training split serves the remaining normal images and keeps the remaining
    anomalous ones in ``paths_by_class`` (the pool the coarse anomalies are drawn from); the
    validation set serves its normal and anomalous images with labels 0/1 and ``classes``, like a
    test split. Raises ValueError when the split has no anomalous image to hold out, or ``share``
    is not in (0, 1).
    """
    if not isinstance(train_set, FolderDataset):
        raise TypeError(f"carve_validation needs a class-labelled data set (FolderDataset), got "
                        f"{type(train_set).__name__}")
    if not 0.0 < float(share) < 1.0:
        raise ValueError(f"validation share must be in (0, 1), got {share}")
    normal = train_set.normal_class
    normal_paths = sorted(train_set.paths)  # the verified normal images the split serves
    anomalous = sorted((p, c) for c, ps in train_set.paths_by_class.items() if c != normal for p in ps)
    if not anomalous:
        raise ValueError(f"the training split at {train_set.root!r} has no anomalous images to hold out for "
                         f"validation (classes: {sorted(train_set.paths_by_class)})")
    rng = np.random.default_rng(seed)
    normal_order = [normal_paths[i] for i in rng.permutation(len(normal_paths))]
    anomalous_order = [anomalous[i] for i in rng.permutation(len(anomalous))]
    v = min(int(len(normal_paths) * share), int(len(anomalous) * share)) + 1
    if v >= len(normal_paths):
        raise ValueError(f"the training split has {len(normal_paths)} normal images: too few to hold out {v} "
                         "for validation and train on the rest")
    held_normal, held_anomalous = set(normal_order[:v]), anomalous_order[:v]
    held_paths = {p for p, _ in held_anomalous}

    train = copy.copy(train_set)
    train.paths_by_class = {c: [p for p in ps if p not in held_normal and p not in held_paths]
                            for c, ps in train_set.paths_by_class.items()}
    keep = [i for i, p in enumerate(train_set.paths) if p not in held_normal]
    train.paths = [train_set.paths[i] for i in keep]
    train.labels = [train_set.labels[i] for i in keep]
    train.classes = [train_set.classes[i] for i in keep]
    train.skipped = list(train_set.skipped)

    valid = copy.copy(train_set)
    valid.split = "validation"
    valid.skipped = []
    # The anomaly pool is indexed but not checked (it is only drawn from): check what is served.
    items = sorted([(p, 0, normal) for p in held_normal] +
                   [(p, 1, c) for p, c in held_anomalous if valid._keep(p)])
    valid.paths_by_class = {c: sorted(p for p, _, k in items if k == c) for c in dict.fromkeys(k for *_, k in items)}
    valid.paths = [p for p, _, _ in items]
    valid.labels = [lab for _, lab, _ in items]
    valid.classes = [c for *_, c in items]
    return train, valid
