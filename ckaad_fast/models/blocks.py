"""The auto-encoder's building blocks: the norms, the ResNet blocks that upsample (crop to an odd
target, see :mod:`.autoencoder`) and the stage that chains them; the discriminators share the
norm and the resizing helpers."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InstanceNorm2d", "make_norm", "fit_spatial", "interp_channels", "log2_exact", "conv3x3", "BasicBlock",
           "Bottleneck", "bottleneck_width", "Stage", "NORMS"]

NORMS = ("instance", "batch")


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
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


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


def log2_exact(value: float) -> int | None:
    """log2(value) if value is a positive integer power of two (including 1), else None."""
    if value < 1 or value != int(value):
        return None
    v = int(value)
    return v.bit_length() - 1 if v & (v - 1) == 0 else None


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
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
        self.conv1 = _deconv(in_channels, out_channels, up) if up > 1 else conv3x3(
            in_channels, out_channels, stride)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
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
        self.conv2 = _deconv(width, width, up) if up > 1 else conv3x3(width, width, stride)
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


def bottleneck_width(out_channels: int, width_per_group: int) -> int:
    # torchvision: width = planes * width_per_group / 64 with planes = out_channels / 4.
    return max(1, out_channels * width_per_group // 256)


class Stage(nn.Module):
    """A ResNet stage whose first block changes the resolution; ``size`` goes to that block."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        x = self.blocks[0](x, size)
        for block in self.blocks[1:]:
            x = block(x)
        return x
