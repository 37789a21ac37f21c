"""The one table of metric names: for each key :func:`ckaad_fast.metrics.evaluate` returns, its
name in text tables (``eval``), its column in the paper's tables (the experiments) and its title
and explanation in the HTML report. Adding a metric adds one row here."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["MetricName", "METRIC_TABLE", "PAPER_ORDER"]


class MetricName(NamedTuple):
    text: str  # in eval's text tables
    column: str  # in the experiments' tables (the paper's headers)
    title: str  # in the HTML report
    help: str  # its explanation there


METRIC_TABLE = {
    "image_auroc": MetricName("image AUROC", "I-AUROC", "Image AUROC",
                              "How well the image score separates defective from good images (1 = perfectly, "
                              "0.5 = chance)."),
    "image_f1": MetricName("image best F1", "F1", "Image F1", "F1 of 'defective' at the best score threshold."),
    "image_acc": MetricName("image accuracy (at best F1)", "ACC", "Image accuracy",
                            "Share of test images judged correctly at that threshold."),
    "pixel_auroc": MetricName("pixel AUROC", "P-AUROC", "Pixel AUROC",
                              "How well the anomaly map separates defect pixels from normal ones."),
    "aupro": MetricName("AUPRO (standard, FPR <= 0.3)", "PRO (FPR≤0.3)", "AUPRO",
                        "Per-region overlap up to 30% false-positive rate (MVTec AD definition): small defects "
                        "count as much as large ones."),
    "aupro_per_image": MetricName("AUPRO (reference per-image protocol)", "PRO (per image)", "AUPRO (per image)",
                                  "The same, averaged per anomalous image (the CKAAD/RD4AD reference code's "
                                  "protocol)."),
    "aupimo": MetricName("AUPIMO (FPR 1e-5 to 1e-4)", "AUPIMO", "AUPIMO",
                         "How much of each defect is found while almost no normal pixel is flagged "
                         "(false-positive rates 1e-5 to 1e-4 on the good images), averaged over defective images."),
    "num_images": MetricName("test images", "images", "Test images", ""),
    "num_anomalous": MetricName("anomalous test images", "anomalous", "of which defective", ""),
}
#: The paper's metrics, in its order (values are fractions, shown as percentages).
PAPER_ORDER = ("image_auroc", "image_f1", "image_acc", "pixel_auroc", "aupro", "aupro_per_image", "aupimo")
