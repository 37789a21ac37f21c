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
from torch import nn

from .backbone import backbone_spec
from .blocks import (NORMS, BasicBlock, Bottleneck, InstanceNorm2d, Stage, bottleneck_width, conv3x3, fit_spatial,
                     interp_channels, log2_exact, make_norm)

__all__ = ["FeatureAutoEncoder", "BasicBlock", "Bottleneck", "InstanceNorm2d"]

_BLOCKS = ("basic", "bottleneck")

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
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
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
            return Bottleneck(cin, cout, bottleneck_width(cout, width_per_group),
                              stride=stride, up=up, norm=norm, out_relu=out_relu)

        # Encoder: per-layer stride-2 conv stacks down to the deepest layer's resolution.
        reducers = []
        for c, s in zip(channels, strides):
            steps = log2_exact(strides[-1] / s)
            layers: list[nn.Module] = []
            cin = c
            for cout in interp_channels(c, channels[-1], steps):
                layers.append(nn.Sequential(conv3x3(cin, cout, 2), make_norm(norm, cout),
                                            nn.ReLU()))
                cin = cout
            reducers.append(nn.Sequential(*layers))
        self.reducers = nn.ModuleList(reducers)

        fused = n * channels[-1]
        self.bottleneck = Stage(
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
            stages.append(Stage(blocks))
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
        if log2_exact(strides[-1] / s) is None:
            raise ValueError(f"strides[-1] / strides[s] must be a power of two for every layer, "
                             f"got strides={strides!r}")
    return channels, strides
