"""What scoring yields for one file: a :class:`ScoreResult`, whoever ran the model (the Scorer's
streams, :mod:`.stream`; an exported graph, :mod:`ckaad_fast.deployment`), and what the results
folder (:mod:`.local`) writes from it. No torch here: the deployment path has none."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ScoreResult", "NON_FINITE_ERROR"]


#: The error of an image whose score is not a finite number (the image or the model gave NaN/Inf).
NON_FINITE_ERROR = "non-finite score ({}): the image or the model produced NaN or infinite values"


@dataclass
class ScoreResult:
    """The result for one file of :meth:`Scorer.score_paths`.

    ``score`` is the image score (None when the file could not be read), ``map`` the anomaly
    map (H, W) float32 at the model's input size, or at the file's own size for a tiled model (None when maps were not asked for or the file
    could not be read), ``error`` a one-line description of why the file could not be scored
    (None when it was), ``image`` the (H, W, 3) uint8 image the model saw (only with
    ``return_images=True``).
    """

    path: str
    score: float | None
    map: np.ndarray | None = None
    error: str | None = None
    image: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
