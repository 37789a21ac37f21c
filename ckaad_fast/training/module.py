"""CKAAD as training sees it: the scoring :class:`~ckaad_fast.model.Detector` plus the
discriminator its strategy trains against (none for ``recon`` and ``recon_sub``).

Scoring never builds this class: a checkpoint holds the discriminator's weights for resuming
training, and :func:`ckaad_fast.model.model_from_checkpoint` leaves them out.
"""
from __future__ import annotations

import os
import warnings

from ..head import feature_sizes
from ..model import Detector, ModelConfig, config_from_checkpoint, fill_from_checkpoint, load_checkpoint
from ..models.discriminator import MultiLayerImageDiscriminator, MultiLayerPatchDiscriminator
from ..strategies import get_strategy

__all__ = ["CKAAD", "ckaad_from_checkpoint"]


class CKAAD(Detector):
    """Backbone F (frozen), auto-encoder G, the inference head and, for the adversarial
    strategies, discriminator D (``self.discriminator``, else None)."""

    def __init__(self, config: ModelConfig, weights: str | os.PathLike | None = "imagenet"):
        kind = get_strategy(config.strategy).discriminator  # a ValueError naming the choices
        super().__init__(config, weights)
        bb = self.backbone
        if kind == "patch":
            self.discriminator = MultiLayerPatchDiscriminator(bb.channels)
        elif kind == "image":
            self.discriminator = MultiLayerImageDiscriminator(bb.channels, feature_sizes(config.image_size, bb.strides))
        else:
            self.discriminator = None


def ckaad_from_checkpoint(ckpt, map_location="cpu") -> CKAAD:
    """Training's model from a checkpoint (a path or a loaded dict), discriminator included."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location)
    config = config_from_checkpoint(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backbone is filled from the checkpoint
        model = CKAAD(config, weights="none")
    return fill_from_checkpoint(model, ckpt, map_location)
