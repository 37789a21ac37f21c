"""Exact, fast anomaly-detection metrics (numpy and scipy only).

Image level
    :func:`image_auroc` is the Mann-Whitney AUROC (ties count one half), equal to
    ``sklearn.metrics.roc_auc_score``. :func:`image_f1_acc` is the best F1 over the thresholds of
    ``sklearn.metrics.precision_recall_curve`` and the accuracy at that threshold, as the CKAAD
    reference code computes them.

Pixel level
    :func:`pixel_auroc` is the AUROC over all pixels of all images. :func:`aupro` is the standard
    (MVTec AD) normalised area under the per-region-overlap curve up to a false-positive rate,
    computed exactly over every distinct threshold. :func:`aupro_per_image` is the CKAAD / RD4AD
    reference-code protocol: 200 evenly spaced thresholds per anomalous image, averaged over
    images. The two AUPRO numbers are different metrics and are not comparable with each other.
    :func:`aupimo` is the per-image overlap at shared false-positive rates of 1e-5 to 1e-4 on
    normal images (AUPIMO), averaged over anomalous images.

:func:`evaluate` computes all of them at once.

Every function takes numpy arrays or CPU torch tensors. Labels and scores have shape ``(N,)``;
masks and maps have shape ``(N, H, W)`` (``(N, 1, H, W)`` is accepted too). Masks are binary,
of any dtype. Scores and maps must be finite.
"""
from __future__ import annotations

import numpy as np

from .inputs import check_fpr_limit, pixel_inputs, require_both_pixel_classes
from .pro import (
    aupro,
    aupro_from_regions,
    aupro_per_image,
    aupro_per_image_values,
    check_num_thresholds,
    label_regions,
    mean_per_image,
)
from .names import METRIC_TABLE, PAPER_ORDER, MetricName
from .pimo import AUPIMO_FPR_BOUNDS, AUPIMO_NUM_THRESHOLDS, AupimoResult, aupimo
from .roc import auroc_sorted_negatives, f1_acc_at, image_auroc, image_f1_acc, pixel_auroc

__all__ = [
    "image_auroc",
    "image_f1_acc",
    "f1_acc_at",
    "pixel_auroc",
    "aupro",
    "aupro_per_image",
    "aupimo",
    "AupimoResult",
    "AUPIMO_FPR_BOUNDS",
    "AUPIMO_NUM_THRESHOLDS",
    "evaluate",
    "METRIC_TABLE",
    "PAPER_ORDER",
    "MetricName",
]


def evaluate(
    labels,
    scores,
    masks=None,
    maps=None,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
) -> dict[str, float]:
    """All metrics: image AUROC, F1 and accuracy, and, given masks and maps, the pixel metrics.

    Returns a dict with ``image_auroc``, ``image_f1``, ``image_acc`` and, when ``masks`` and
    ``maps`` are given, ``pixel_auroc``, ``aupro`` (standard definition, :func:`aupro`) and
    ``aupro_per_image`` (reference protocol, :func:`aupro_per_image`) and ``aupimo`` (the mean
    AUPIMO of the anomalous images, :func:`aupimo`; left out where it cannot be measured: no
    normal image, or too few normal pixels to reach a false-positive rate of 1e-5). Inputs are validated
    and regions labelled once for all pixel metrics.
    """
    out: dict[str, float] = {"image_auroc": image_auroc(labels, scores)}
    f1, acc, _ = image_f1_acc(labels, scores)
    out["image_f1"], out["image_acc"] = f1, acc
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together")
    if masks is not None:
        fpr_limit = check_fpr_limit(fpr_limit)
        num_thresholds = check_num_thresholds(num_thresholds)
        m, a = pixel_inputs(masks, maps)
        if m.shape[0] != len(out_labels := np.asarray(labels).reshape(-1)):
            raise ValueError(f"labels and masks must describe the same images: got {len(out_labels)} labels "
                             f"and {m.shape[0]} masks")
        require_both_pixel_classes(m)
        region_labels, n_regions = label_regions(m)
        # One sort of the normal pixels serves both the pixel AUROC and the standard AUPRO.
        normal_sorted = np.sort(a[~m])
        out["pixel_auroc"] = auroc_sorted_negatives(normal_sorted, a[m])
        out["aupro"] = aupro_from_regions(m, a, region_labels, n_regions, fpr_limit, normal_sorted)
        out["aupro_per_image"] = mean_per_image(
            aupro_per_image_values(m, a, region_labels, num_thresholds, fpr_limit)
        )
        try:
            out["aupimo"] = aupimo(m, a).mean
        except ValueError:  # no normal image, or too few normal pixels for its FPR range: left out
            pass
    return out
