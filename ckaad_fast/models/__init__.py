"""Networks of CKAAD: frozen backbones, auto-encoder, discriminators."""

from .autoencoder import FeatureAutoEncoder
from .blocks import InstanceNorm2d
from .backbone import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AutoEncoderRecipe,
    BackboneSpec,
    FeatureExtractor,
    backbone_spec,
    build_backbone,
    lite0_weights_path,
)
from .discriminator import (
    ImageEnergyDiscriminator,
    MultiLayerImageDiscriminator,
    MultiLayerPatchDiscriminator,
    PatchEnergyDiscriminator,
)
from .efficientnet_lite import EfficientNetLite0

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AutoEncoderRecipe",
    "BackboneSpec",
    "EfficientNetLite0",
    "FeatureAutoEncoder",
    "FeatureExtractor",
    "ImageEnergyDiscriminator",
    "InstanceNorm2d",
    "MultiLayerImageDiscriminator",
    "MultiLayerPatchDiscriminator",
    "PatchEnergyDiscriminator",
    "backbone_spec",
    "build_backbone",
    "lite0_weights_path",
]
