"""The coarse anomaly set: labelled anomalies drawn by the paper's protocol, anomaly folders, and
elastic pseudo-anomalies for data sets without any.

========================  =====================================================================
data set                  item
========================  =====================================================================
:class:`AnomalyFolderDataset`  ``(image, 1, path)``; image-level labels only
:class:`PseudoAnomalyDataset`  ``(distorted image, 1, path of the normal image it came from)``
========================  =====================================================================

:func:`coarse_anomaly_set` picks the set a training run uses, the same rule for the Python API
and ``ckaad-fast train``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ArgumentError
from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from .files import list_images
from .images import SizeLike
from .base import ImageFileDataset
from .folder import FolderDataset

__all__ = ["RATIO_LABELED", "CoarseAnomalies", "sample_coarse_anomalies", "AnomalyFolderDataset", "PseudoAnomalyDataset",
           "coarse_anomaly_set"]

#: The paper's default share r_l of labelled anomalies in a class-folder training set (5%).
RATIO_LABELED = 0.05

PathLike = Union[str, os.PathLike]


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
    by_class, _normal, candidates, n_norm = _class_pools(source, normal_class, num_normal)
    rng = np.random.default_rng(seed)
    chosen = _choose_classes(candidates, classes, num_classes, rng)

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


def _class_pools(source, normal_class, num_normal) -> tuple[dict[str, list[str]], str | None, list[str], int]:
    """(sorted paths per class, the normal class, the anomaly classes to draw from, n_normal)."""
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
    return by_class, normal, candidates, n_norm


def _choose_classes(candidates: list[str], classes, num_classes: int, rng: np.random.Generator) -> list[str]:
    """The given ``classes`` (checked), else ``num_classes`` drawn at random from ``candidates``."""
    if classes is not None:
        chosen = [classes] if isinstance(classes, str) else list(classes)
        bad = [c for c in chosen if c not in candidates]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"classes must be distinct anomaly classes among {candidates}, got {chosen}")
        return chosen
    k = int(num_classes)
    if not 1 <= k <= len(candidates):
        raise ValueError(
            f"num_classes (k) must be between 1 and {len(candidates)} (the anomaly classes {candidates}), "
            f"got {num_classes}"
        )
    return [candidates[i] for i in rng.permutation(len(candidates))[:k]]


class AnomalyFolderDataset(ImageFileDataset):
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
        #: How the images were drawn, when ``source`` is a :class:`CoarseAnomalies`.
        self.coarse = source if isinstance(source, CoarseAnomalies) else None
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


def coarse_anomaly_set(
    train_set: Dataset,
    *,
    anomaly_dir: PathLike | None = None,
    ratio_labeled: float = RATIO_LABELED,
    num_classes: int = 1,
    seed: int | None = 0,
    image_size: SizeLike = 256,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> AnomalyFolderDataset | None:
    """The coarse anomaly set of a training run on ``train_set``, by the paper's protocols.

    - ``anomaly_dir`` given: its images, known only to be anomalous.
    - Class-folder training data (a :class:`FolderDataset`, the medical protocol) with
      ``ratio_labeled`` > 0: labelled anomalies drawn from the training split's other classes by
      :func:`sample_coarse_anomalies` (``num_classes`` classes, ``seed``).
    - Otherwise None: the industrial protocol, where :func:`ckaad_fast.training.train` pairs every
      normal batch with its elastic distortion.

    Images are read at ``image_size`` and normalised with ``mean``/``std`` (the backbone's). Errors
    are :class:`~ckaad_fast.errors.ArgumentError` exceptions naming the argument at fault.
    """
    if anomaly_dir is not None:
        if not os.path.isdir(anomaly_dir):
            raise ArgumentError("anomaly_dir", f"folder {os.fspath(anomaly_dir)!r} does not exist")
        try:
            return AnomalyFolderDataset(anomaly_dir, image_size, mean, std)
        except ValueError as e:
            raise ArgumentError("anomaly_dir", str(e)) from None
    if not isinstance(train_set, FolderDataset) or not ratio_labeled > 0:
        return None
    try:
        coarse = sample_coarse_anomalies(train_set, ratio_labeled, num_classes, seed=seed)
    except ValueError as e:
        raise ArgumentError("ratio_labeled", str(e)) from None
    return AnomalyFolderDataset(coarse, image_size, mean, std)
