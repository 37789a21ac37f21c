"""The feature auto-encoder G of CKAAD (paper Eq. 1, Fig. 1).

Architecture (paper, Method section, and the authors' released model files):

* Encoder. Each chosen backbone layer s is brought down to the deepest chosen layer's resolution
  by a stack of 3x3 stride-2 convs (InstanceNorm with affine, ReLU). The stacks' outputs are
  concatenated along channels and one ResNet stage with stride 2 (BasicBlock x2 for resnet18,
  Bottleneck x3 for the 50/101 nets, InstanceNorm in place of BatchNorm) produces the latent z,
  which has twice the deepest layer's channels at half its resolution.
* Decoder. One ResNet stage per reconstructed layer, deepest first. A stage's first block
  upsamples with a 2x2 stride-2 transposed conv (in both the residual branch and the shortcut);
  the stage's output *is* that layer's reconstruction and is also the next stage's input.

Generalisation beyond ResNets. The paper only uses ResNets, where every stride doubling also
doubles the channels. Backbones such as EfficientNet-Lite0 (24, 40, 112, 320 channels at strides
4..32) break that, so the shapes here are derived from (channels, strides) instead of from the
ResNet family name, with rules that reduce to the paper's exactly when channels double per
stride doubling:

* Encoder stack for layer s: log2(strides[-1] / strides[s]) convs (the paper: "until the map has
  the smallest layer's size"). Its channels go from channels[s] to channels[-1] geometrically,
  i.e. c_k = channels[s] * (channels[-1] / channels[s]) ** (k / n). For a ResNet that ratio is
  2**n, so every conv doubles the channels, as in the paper; for EfficientNet 24 -> 112 in two
  convs it is 24 -> 52 -> 112. Every stack ends at channels[-1], so the concatenation always has
  len(channels) * channels[-1] channels, as in the paper.
* Latent z: 2 * channels[-1] channels (the paper's ResNet stage doubles the width).
* Decoder stage for layer s: input = previous stage's output (z for the deepest), output =
  channels[s] (the real channels, so the reconstruction can be compared with F^s). The official
  code hard-codes the input as 2 * channels[s], which is the same thing for ResNets. Its
  upsampling factor is strides[s+1] / strides[s] (2 for the deepest stage, whose input is z);
  the transposed conv uses kernel = stride = that factor, i.e. the paper's 2x2/2 when layers are
  consecutive.
* Bottleneck width: out_channels / 4 * width_per_group / 64, torchvision's rule (wide_resnet50_2
  has width_per_group 128, so its bottlenecks are twice as wide as resnet50's).
* Blocks per decoder stage, deepest first: ResNet's per-stage counts in order, e.g. (3, 4, 6, 3)
  for resnet50/wide_resnet50_2 and (2, 2, 2, 2) for resnet18, as the authors' code does (so the
  stage that reconstructs wide_resnet50_2's layer 1 has 6 bottlenecks).

Odd input sizes. Stride-2 3x3 convs (padding 1) map n -> ceil(n/2), as a ResNet does, but a 2x2
stride-2 transposed conv maps m -> 2m, which overshoots an odd target by one (3 -> 6, not 5), and
output_padding cannot shrink it. So each upsampling block crops its upsampled tensors (residual
branch and shortcut alike, before their norms) to the target size, keeping the top-left part.
Top-left is the aligned choice: output 2i of the transposed conv sits on the input position the
stride-2 conv centred output i on. For even sizes (the paper's 256x256 setting) nothing is
cropped. Encoder stacks that do not land exactly on the deepest map's size (a backbone that
rounds down rather than up) are cropped or zero-padded the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import backbone_spec

__all__ = ["FeatureAutoEncoder", "BasicBlock", "Bottleneck", "InstanceNorm2d"]

_BLOCKS = ("basic", "bottleneck")
_NORMS = ("instance", "batch")

class InstanceNorm2d(nn.GroupNorm):
    """Instance norm (per image and channel, over H x W; eps 1e-5; optional per-channel affine).

    Computed as GroupNorm with one channel per group, which is the same function with the same
    parameters (``weight``, ``bias`` of shape (C,)) as ``nn.InstanceNorm2d(C, affine=...)``
    without running statistics. Why not nn.InstanceNorm2d: PyTorch implements it by viewing the
    batch as (1, B*C, H, W) and calling batch norm, which returns NCHW even for a channels_last
    input (and on CPU is several times slower), so every conv after it would pay a layout
    conversion; group norm keeps channels_last.
    """

    def __init__(self, channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's CPU group norm on channels_last bfloat16/float16 maps is 5-15x slower than on
        # NCHW ones when a map has no more positions than channels (measured on a 2-core Xeon with
        # AMX, torch 2.14: 6.5 ms against 0.56 ms at 8x256x16x16), and faster otherwise: take the
        # NCHW path for those maps only, and hand back the layout that came in. Same arithmetic.
        if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 4
                and x.shape[2] * x.shape[3] <= x.shape[1] and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()):
            y = super().forward(x.contiguous())
            return y.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def make_norm(kind: str, channels: int) -> nn.Module:
    # Instance norm is the paper's choice: per-image statistics keep a batch that mixes normal
    # and anomalous images (or reconstructions) from leaking statistics between them.
    if kind == "instance":
        return InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be one of {_NORMS}, got {kind!r}")


def fit_spatial(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop (top-left) or zero-pad (bottom/right) ``x`` to spatial ``size``; no-op when equal."""
    h, w = int(size[0]), int(size[1])
    xh, xw = x.shape[-2], x.shape[-1]
    if xh == h and xw == w:
        return x
    if xh > h or xw > w:
        x = x[..., : min(xh, h), : min(xw, w)]
    if x.shape[-2] < h or x.shape[-1] < w:
        x = F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
    return x


def interp_channels(c_in: int, c_out: int, n: int) -> list[int]:
    """Channel counts after each of ``n`` convs going from ``c_in`` to ``c_out``.

    Exact doubling when ``c_out == c_in * 2**n`` (ResNets, the paper's rule); otherwise a
    geometric progression rounded to integers that ends exactly at ``c_out``.
    """
    if n == 0:
        return []
    if c_out == c_in * 2**n:
        return [c_in * 2**k for k in range(1, n + 1)]
    ratio = c_out / c_in
    chans = [max(1, round(c_in * ratio ** (k / n))) for k in range(1, n)]
    return chans + [c_out]


def _log2_exact(value: float) -> int | None:
    """log2(value) if value is a positive integer power of two (including 1), else None."""
    if value < 1 or value != int(value):
        return None
    v = int(value)
    return v.bit_length() - 1 if v & (v - 1) == 0 else None


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _deconv(cin: int, cout: int, factor: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, factor, stride=factor, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) that can downsample (``stride``) or upsample (``up``).

    With ``up > 1`` the first conv is an ``up x up`` transposed conv of stride ``up`` and so is
    the shortcut's projection; ``forward(x, size)`` then crops both to ``size`` (see module doc).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, up: int = 1,
                 norm: str = "instance", out_relu: bool = True) -> None:
        super().__init__()
        if stride > 1 and up > 1:
            raise ValueError("a block cannot both downsample (stride) and upsample (up)")
        self.up = up
        self.out_relu = out_relu
        self.conv1 = _deconv(in_channels, out_channels, up) if up > 1 else _conv3x3(
            in_channels, out_channels, stride)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = _make_shortcut(in_channels, out_channels, stride, up, norm)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        out = self.conv1(x)
        if size is not None:
            out = fit_spatial(out, size)
        out = F.relu(self.norm1(out))
        out = self.norm2(self.conv2(out)) + _apply_shortcut(self.shortcut, x, size)
        return F.relu(out) if self.out_relu else out


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1) that can downsample (``stride``) or upsample (``up``).

    ``width`` is the inner width. Downsampling is on the 3x3 conv (torchvision's ResNet v1.5);
    upsampling replaces that conv by an ``up x up`` transposed conv of stride ``up``.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, stride: int = 1,
                 up: int = 1, norm: str = "instance", out_relu: bool = True) -> None:
        super().__init__()
        if stride > 1 and up > 1:
            raise ValueError("a block cannot both downsample (stride) and upsample (up)")
        self.up = up
        self.out_relu = out_relu
        self.conv1 = _conv1x1(in_channels, width)
        self.norm1 = make_norm(norm, width)
        self.conv2 = _deconv(width, width, up) if up > 1 else _conv3x3(width, width, stride)
        self.norm2 = make_norm(norm, width)
        self.conv3 = _conv1x1(width, out_channels)
        self.norm3 = make_norm(norm, out_channels)
        self.shortcut = _make_shortcut(in_channels, out_channels, stride, up, norm)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.conv2(out)
        if size is not None:
            out = fit_spatial(out, size)
        out = F.relu(self.norm2(out))
        out = self.norm3(self.conv3(out)) + _apply_shortcut(self.shortcut, x, size)
        return F.relu(out) if self.out_relu else out


def _make_shortcut(cin: int, cout: int, stride: int, up: int, norm: str) -> nn.Module | None:
    if up > 1:
        return nn.Sequential(_deconv(cin, cout, up), make_norm(norm, cout))
    if stride > 1 or cin != cout:
        return nn.Sequential(_conv1x1(cin, cout, stride), make_norm(norm, cout))
    return None


def _apply_shortcut(shortcut: nn.Module | None, x: torch.Tensor,
                    size: Sequence[int] | None) -> torch.Tensor:
    if shortcut is None:
        return x
    conv, norm = shortcut[0], shortcut[1]
    h = conv(x)
    if size is not None:
        # Crop before the norm, as in the residual branch, so both normalise the same region.
        h = fit_spatial(h, size)
    return norm(h)


def _bottleneck_width(out_channels: int, width_per_group: int) -> int:
    # torchvision: width = planes * width_per_group / 64 with planes = out_channels / 4.
    return max(1, out_channels * width_per_group // 256)


class _Stage(nn.Module):
    """A ResNet stage whose first block changes the resolution; ``size`` goes to that block."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        x = self.blocks[0](x, size)
        for block in self.blocks[1:]:
            x = block(x)
        return x


class FeatureAutoEncoder(nn.Module):
    """CKAAD's auto-encoder G: reconstructs a list of backbone feature maps (paper Eq. 1).

    Args:
        channels: channels of each chosen feature layer, shallow to deep (e.g. (256, 512, 1024)
            for wide_resnet50_2 layers 1-3).
        strides: each layer's stride w.r.t. the image (e.g. (4, 8, 16)); strictly increasing,
            and every ratio strides[-1] / strides[s] must be a power of two.
        block: "basic" (resnet18/34) or "bottleneck" (resnet50 and wider/deeper) residual blocks.
        norm: "instance" (the paper; affine InstanceNorm) or "batch".
        width_per_group: bottleneck width rule as in torchvision (64; 128 for wide_resnet*_2).
            Must be 64 for "basic".
        encoder_blocks: blocks in the encoder's stride-2 stage; default 2 ("basic") or 3
            ("bottleneck"). The authors use 3 for resnet34.
        decoder_blocks: blocks per decoder stage, deepest first; default (2, 2, 2, 2) for
            "basic" and (3, 4, 6, 3) for "bottleneck". Needs at least len(channels) entries.
        final_relu: keep the ReLU that ends every residual block on the reconstructions too
            (the paper's ResNet features are post-ReLU, hence non-negative). Set False for
            backbones whose features can be negative (EfficientNet's linear-bottleneck outputs),
            else the reconstruction cannot match them.

    ``forward(features)`` takes the list of maps (B, channels[s], H_s, W_s), shallow to deep,
    and returns reconstructions of exactly the same shapes. The latent map has half the deepest
    map's size (rounded up); with instance norm it must have more than one position, so the
    deepest map must be larger than 2x2 (ValueError otherwise).

    See the module docstring for how the architecture generalises beyond ResNets.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], block: str = "basic",
                 norm: str = "instance", *, width_per_group: int = 64,
                 encoder_blocks: int | None = None,
                 decoder_blocks: Sequence[int] | None = None,
                 final_relu: bool = True) -> None:
        super().__init__()
        channels, strides = _check_layers(channels, strides)
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {_BLOCKS}, got {block!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if not isinstance(width_per_group, int) or width_per_group < 1:
            raise ValueError(f"width_per_group must be a positive int, got {width_per_group!r}")
        if block == "basic" and width_per_group != 64:
            raise ValueError(f"width_per_group must be 64 for block='basic', got {width_per_group}")
        n = len(channels)
        if encoder_blocks is None:
            encoder_blocks = 2 if block == "basic" else 3
        if not isinstance(encoder_blocks, int) or encoder_blocks < 1:
            raise ValueError(f"encoder_blocks must be a positive int, got {encoder_blocks!r}")
        if decoder_blocks is None:
            decoder_blocks = (2, 2, 2, 2) if block == "basic" else (3, 4, 6, 3)
            # More than four layers is outside ResNet's layout; repeat the last count.
            decoder_blocks = tuple(decoder_blocks) + (decoder_blocks[-1],) * max(0, n - 4)
        decoder_blocks = tuple(decoder_blocks)
        if len(decoder_blocks) < n or any(not isinstance(b, int) or b < 1
                                          for b in decoder_blocks):
            raise ValueError(f"decoder_blocks must hold at least len(channels)={n} positive "
                             f"ints, got {decoder_blocks!r}")

        self.channels = channels
        self.strides = strides
        self.block = block
        self.norm = norm
        self.width_per_group = width_per_group
        self.final_relu = final_relu
        self.latent_channels = 2 * channels[-1]
        self.latent_stride = 2 * strides[-1]

        def make_block(cin: int, cout: int, stride: int = 1, up: int = 1,
                       out_relu: bool = True) -> nn.Module:
            if block == "basic":
                return BasicBlock(cin, cout, stride=stride, up=up, norm=norm, out_relu=out_relu)
            return Bottleneck(cin, cout, _bottleneck_width(cout, width_per_group),
                              stride=stride, up=up, norm=norm, out_relu=out_relu)

        # Encoder: per-layer stride-2 conv stacks down to the deepest layer's resolution.
        reducers = []
        for c, s in zip(channels, strides):
            steps = _log2_exact(strides[-1] / s)
            layers: list[nn.Module] = []
            cin = c
            for cout in interp_channels(c, channels[-1], steps):
                layers.append(nn.Sequential(_conv3x3(cin, cout, 2), make_norm(norm, cout),
                                            nn.ReLU()))
                cin = cout
            reducers.append(nn.Sequential(*layers))
        self.reducers = nn.ModuleList(reducers)

        fused = n * channels[-1]
        self.bottleneck = _Stage(
            [make_block(fused, self.latent_channels, stride=2)]
            + [make_block(self.latent_channels, self.latent_channels)
               for _ in range(encoder_blocks - 1)])

        # Decoder: one stage per layer, deepest first; self.stages[k] reconstructs layer
        # n - 1 - k.
        stages = []
        cin = self.latent_channels
        for k in range(n):
            s = n - 1 - k
            up = 2 if k == 0 else strides[s + 1] // strides[s]
            cout = channels[s]
            nb = decoder_blocks[k]
            # Only a stage's last block emits the reconstruction, so only it drops its ReLU.
            blocks = [make_block(cin, cout, up=up, out_relu=final_relu or nb > 1)]
            blocks += [make_block(cout, cout, out_relu=final_relu or i < nb - 2)
                       for i in range(nb - 1)]
            stages.append(_Stage(blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)

        self.reset_parameters()

    @classmethod
    def for_backbone(cls, name: str, layers: Sequence[int], **kwargs) -> "FeatureAutoEncoder":
        """The auto-encoder of backbone ``name`` and its ``layers`` (1-based), built by the recipe
        of the backbone table (:func:`ckaad_fast.models.backbone.backbone_spec`): for the ResNets,
        the authors' configuration. :class:`ckaad_fast.model.Detector` builds its G this way.

        E.g. ``for_backbone("wide_resnet50_2", (1, 2, 3))`` or ``for_backbone("resnet18", (2, 3))``.
        Keyword arguments override the recipe (e.g. ``norm``).
        """
        spec = backbone_spec(name)
        layers = list(layers)
        if not layers or any(l not in (1, 2, 3, 4) for l in layers) or sorted(set(layers)) != layers:
            raise ValueError(f"layers must be increasing layer numbers in 1..4, got {layers!r}")
        r = spec.autoencoder
        cfg = dict(block=r.block, width_per_group=r.width_per_group, encoder_blocks=r.encoder_blocks,
                   decoder_blocks=r.decoder_blocks, final_relu=r.final_relu)
        cfg.update(kwargs)
        return cls([spec.channels[l - 1] for l in layers], [spec.strides[l - 1] for l in layers], **cfg)

    def reset_parameters(self) -> None:
        # The authors' init: Kaiming (fan_out) on the ordinary convs only; transposed convs and
        # norms keep PyTorch's defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_features(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.channels):
            raise ValueError(f"features must hold {len(self.channels)} maps (one per layer), "
                             f"got {len(features)}")
        batch = features[0].shape[0] if features[0].dim() == 4 else None
        for s, (f, c) in enumerate(zip(features, self.channels)):
            if f.dim() != 4:
                raise ValueError(f"features[{s}] must be (B, C, H, W), got shape "
                                 f"{tuple(f.shape)}")
            if f.shape[1] != c:
                raise ValueError(f"features[{s}] must have {c} channels, got {f.shape[1]}")
            if f.shape[0] != batch:
                raise ValueError(f"features must share one batch size, got {batch} and "
                                 f"{f.shape[0]} (features[{s}])")

    def encode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Latent z: (B, 2 * channels[-1], ceil(H_deep / 2), ceil(W_deep / 2))."""
        self._check_features(features)
        deep = features[-1].shape[-2:]
        if self.norm == "instance" and math.ceil(deep[0] / 2) * math.ceil(deep[1] / 2) == 1:
            # Instance norm over a single position outputs its bias whatever the input, which
            # would cut every gradient to the encoder; nn.InstanceNorm2d raises here too.
            raise ValueError(f"features[-1] must be larger than 2x2 so the latent map has more "
                             f"than one position, got {tuple(deep)}")
        reduced = [fit_spatial(r(f), deep) for r, f in zip(self.reducers, features)]
        return self.bottleneck(torch.cat(reduced, dim=1))

    def decode(self, z: torch.Tensor,
               sizes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """Reconstructions, shallow to deep, of spatial ``sizes`` (default: no cropping)."""
        if sizes is not None and len(sizes) != len(self.channels):
            raise ValueError(f"sizes must hold {len(self.channels)} (H, W) pairs, "
                             f"got {len(sizes)}")
        outputs = []
        x = z
        n = len(self.stages)
        for k, stage in enumerate(self.stages):
            x = stage(x, None if sizes is None else sizes[n - 1 - k])
            outputs.append(x)
        outputs.reverse()
        return outputs

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        z = self.encode(features)
        return self.decode(z, [tuple(f.shape[-2:]) for f in features])


def _check_layers(channels: Sequence[int], strides: Sequence[int]) -> tuple[tuple, tuple]:
    channels = tuple(channels)
    strides = tuple(strides)
    if len(channels) == 0:
        raise ValueError("channels must name at least one layer")
    if len(channels) != len(strides):
        raise ValueError(f"channels and strides must have the same length, got "
                         f"{len(channels)} and {len(strides)}")
    for name, vals in (("channels", channels), ("strides", strides)):
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in vals):
            raise ValueError(f"{name} must be positive ints, got {vals!r}")
    if any(b <= a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"strides must be strictly increasing (shallow to deep), got {strides!r}")
    for s in strides:
        if _log2_exact(strides[-1] / s) is None:
            raise ValueError(f"strides[-1] / strides[s] must be a power of two for every layer, "
                             f"got strides={strides!r}")
    return channels, strides
