"""Networks of CKAAD: frozen backbones, auto-encoder, discriminators."""

from .backbone import BACKBONES, FeatureExtractor, build_backbone, lite0_weights_path
from .efficientnet_lite import EfficientNetLite0

__all__ = ["BACKBONES", "EfficientNetLite0", "FeatureExtractor", "build_backbone",
           "lite0_weights_path"]
