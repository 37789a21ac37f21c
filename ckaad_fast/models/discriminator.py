"""CKAAD's discriminators: patch-level (default, Eq. 11-12) and image-level (CKAImg, Eq. 8-9).

Every module here returns RAW scores. The energy of the paper is ``|score|`` and the losses
(hinge with margin a for the energy strategies, BCE-with-logits for the vanilla ``gan``
strategy of Eq. 7) live with the loss ops, so the same networks serve every strategy.

* ``PatchEnergyDiscriminator``: one score per position, a position-wise MLP (1x1 convs) on the
  channel-L2-normalised features, as in the authors' released code. Normalising makes the score
  depend only on the feature's direction, which is also what the cosine reconstruction loss and
  the cosine anomaly map look at.
* ``ImageEnergyDiscriminator``: one score per image. The authors' file keeps an (unused,
  shadowed) image-level class, which is what is reproduced here: each layer goes down to the
  deepest layer's resolution through 3x3 stride-2 convs (InstanceNorm without affine,
  LeakyReLU 0.1) that double the channels; the layers are concatenated; more 3x3 stride-2 convs
  to the deepest layer's width bring the map to 2x2; a last conv covering the whole remaining
  map makes it one vector per image; then Linear(c, c/4), a per-image normalisation of that
  vector, LeakyReLU 0.1 and Linear(c/4, 1). No bias anywhere, and no L2 normalisation of the
  input. ``MultiLayerImageDiscriminator(fuse=True)`` is that fused network; ``fuse=False`` gives
  one independent ``ImageEnergyDiscriminator`` per layer instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import InstanceNorm2d, fit_spatial, interp_channels

__all__ = ["PatchEnergyDiscriminator", "MultiLayerPatchDiscriminator",
           "ImageEnergyDiscriminator", "MultiLayerImageDiscriminator"]

_SLOPE = 0.1


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _size2(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1
                              for v in value):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair, got {value!r}")
    return value


def _check_map(name: str, x: torch.Tensor, channels: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got {x.shape[1]}")


def _check_list(features: Sequence[torch.Tensor], n: int) -> None:
    if len(features) != n:
        raise ValueError(f"features must hold {n} maps (one per layer), got {len(features)}")


class PatchEnergyDiscriminator(nn.Module):
    """Patch-level energy discriminator D^s for one feature layer (paper Eq. 11-12).

    ``forward(x)`` maps (B, C, H, W) features to a raw score map (B, 1, H, W): features are
    L2-normalised over channels, then 1x1 conv (C->C), LeakyReLU(0.1), 1x1 conv (C->C),
    LeakyReLU(0.1), 1x1 conv (C->1), all without bias. The energy is ``|score|``; being
    bias-free and fed unit vectors, the score is invariant to any positive per-position
    scaling of the features.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = _positive_int("channels", channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv3 = nn.Conv2d(channels, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map("x", x, self.channels)
        h = F.normalize(x, dim=1)
        h = F.leaky_relu(self.conv1(h), _SLOPE)
        h = F.leaky_relu(self.conv2(h), _SLOPE)
        return self.conv3(h)


class MultiLayerPatchDiscriminator(nn.Module):
    """One ``PatchEnergyDiscriminator`` per feature layer; returns a list of (B, 1, H_s, W_s)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels must name at least one layer")
        self.channels = channels
        self.layers = nn.ModuleList(PatchEnergyDiscriminator(c) for c in channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        _check_list(features, len(self.layers))
        return [d(f) for d, f in zip(self.layers, features)]


def _conv_in_lrelu(cin: int, cout: int) -> nn.Sequential:
    # Non-affine instance norm, as in the authors' image-level discriminator.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                         InstanceNorm2d(cout, affine=False), nn.LeakyReLU(_SLOPE))


class ImageEnergyDiscriminator(nn.Module):
    """Image-level energy discriminator (the ``cka_img`` strategy, paper Eq. 8-9).

    Reduces a (B, channels, H, W) map, with (H, W) == ``spatial_size`` fixed at construction,
    to one raw score per image, (B, 1); the energy is ``|score|``.

    3x3 stride-2 convs (``channels`` -> ``width`` for the first, then ``width`` -> ``width``;
    non-affine InstanceNorm, LeakyReLU 0.1) until both sides are at most 2, then a bias-free
    conv whose kernel covers the whole remaining map (the authors' 2x2 stride-2 conv on their
    2x2 map) gives one ``width`` vector per image. A head Linear(width, width // 4), a
    per-image normalisation of that vector (what ``InstanceNorm1d`` does to a 2-D input in the
    authors' code, i.e. a LayerNorm without affine), LeakyReLU 0.1 and Linear(width // 4, 1)
    gives the score. ``width`` defaults to ``channels``. For power-of-two sizes this is the
    authors' network; for odd sizes they stop one conv earlier and their last 2x2 conv reads only
    the top-left 2x2 of a 3x3 map, whereas this one keeps halving and covers the whole map.
    """

    def __init__(self, channels: int, spatial_size: int | Sequence[int],
                 width: int | None = None) -> None:
        super().__init__()
        self.channels = _positive_int("channels", channels)
        self.spatial_size = _size2("spatial_size", spatial_size)
        self.width = _positive_int("width", channels if width is None else width)
        h, w = self.spatial_size
        convs = []
        cin = channels
        while max(h, w) > 2:
            convs.append(_conv_in_lrelu(cin, self.width))
            cin = self.width
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.convs = nn.Sequential(*convs)
        self.pool = nn.Conv2d(cin, self.width, (h, w), bias=False)
        hidden = max(1, self.width // 4)
        self.fc1 = nn.Linear(self.width, hidden, bias=False)
        self.vec_norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.fc2 = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map("x", x, self.channels)
        if tuple(x.shape[-2:]) != self.spatial_size:
            raise ValueError(f"x must have spatial size {self.spatial_size}, got "
                             f"{tuple(x.shape[-2:])}")
        h = self.pool(self.convs(x)).flatten(1)
        h = F.leaky_relu(self.vec_norm(self.fc1(h)), _SLOPE)
        return self.fc2(h)


class MultiLayerImageDiscriminator(nn.Module):
    """Image-level discriminator over several layers; returns a list of (B, 1) score tensors.

    Args:
        channels: channels of each layer, shallow to deep.
        spatial_sizes: each layer's (H, W) (or int for square), fixed at construction.
        fuse: True (the authors' design) reduces every layer to the deepest layer's resolution
            with 3x3 stride-2 convs (non-affine InstanceNorm, LeakyReLU 0.1; channels go toward
            channels[-1] by the auto-encoder's rule, i.e. doubling for ResNets), concatenates
            them and scores the result with one ``ImageEnergyDiscriminator`` of width
            channels[-1]: the output list then holds ONE (B, 1) tensor. False keeps one
            independent ``ImageEnergyDiscriminator`` per layer and returns one (B, 1) per layer.

    Either way the loss can treat the list like the patch discriminator's (mean per tensor,
    summed over the list).
    """

    def __init__(self, channels: Sequence[int], spatial_sizes: Sequence[int | Sequence[int]],
                 fuse: bool = True) -> None:
        super().__init__()
        channels = tuple(channels)
        spatial_sizes = tuple(spatial_sizes)
        if not channels:
            raise ValueError("channels must name at least one layer")
        if len(channels) != len(spatial_sizes):
            raise ValueError(f"channels and spatial_sizes must have the same length, got "
                             f"{len(channels)} and {len(spatial_sizes)}")
        for s, c in enumerate(channels):
            _positive_int(f"channels[{s}]", c)
        sizes = tuple(_size2(f"spatial_sizes[{s}]", v) for s, v in enumerate(spatial_sizes))
        self.channels = channels
        self.spatial_sizes = sizes
        self.fuse = bool(fuse)
        if not self.fuse:
            self.layers = nn.ModuleList(ImageEnergyDiscriminator(c, hw)
                                        for c, hw in zip(channels, sizes))
            return
        deep = sizes[-1]
        reducers = []
        for s, (c, (h, w)) in enumerate(zip(channels, sizes)):
            ratio = max(h / deep[0], w / deep[1])
            if ratio < 1:
                raise ValueError(f"spatial_sizes must not grow with depth, got {sizes!r}")
            # round(): tolerates backbones that round sizes down instead of up; the result is
            # cropped/padded onto the deepest size in forward.
            steps = round(math.log2(ratio))
            layers = []
            cin = c
            for cout in interp_channels(c, channels[-1], steps):
                layers.append(_conv_in_lrelu(cin, cout))
                cin = cout
            reducers.append(nn.Sequential(*layers))
        self.reducers = nn.ModuleList(reducers)
        self.head = ImageEnergyDiscriminator(len(channels) * channels[-1], deep,
                                             width=channels[-1])

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        _check_list(features, len(self.channels))
        for s, (f, c) in enumerate(zip(features, self.channels)):
            _check_map(f"features[{s}]", f, c)
            if tuple(f.shape[-2:]) != self.spatial_sizes[s]:
                raise ValueError(f"features[{s}] must have spatial size "
                                 f"{self.spatial_sizes[s]}, got {tuple(f.shape[-2:])}")
        if not self.fuse:
            return [d(f) for d, f in zip(self.layers, features)]
        deep = self.spatial_sizes[-1]
        reduced = [fit_spatial(r(f), deep) for r, f in zip(self.reducers, features)]
        return [self.head(torch.cat(reduced, dim=1))]
