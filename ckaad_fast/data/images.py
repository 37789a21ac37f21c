"""Reading images and masks as tensors: one conversion and resize rule for training, evaluation
and scoring, so the same file gives the same input everywhere.

Images are resized with PIL's bilinear filter (as the reference code does), converted to float in
[0, 1] and normalised with ImageNet's mean and std unless other ``mean``/``std`` are given
(``mean=None`` leaves them in [0, 1]). Masks are resized with nearest neighbour and binarised
(any non-zero pixel is anomalous).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD
from ..pixels import (HIGH_DEPTH_MODES, MAX_UPSCALE, ImageRejected, PathLike, SizeLike, check_finite, check_source_size,
                      decode_pixels, minimum_source_size, norm_stats, size_hw, to_rgb_float01)

__all__ = ["HIGH_DEPTH_MODES", "MAX_UPSCALE", "ImageRejected", "SizeLike", "size_hw", "norm_stats",
           "minimum_source_size", "check_source_size", "check_finite", "to_rgb_float01", "load_image", "load_mask",
           "decode_image"]

def normalise_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw images (uint8 in [0, 255], or floats in [0, 1]) as the network's input: ``(x / 255 -
    mean) / std`` in float32. The one arithmetic the Scorer, the exported graph and the int8
    export's pixel table share (and
    :func:`load_image`, on floats), so that all of them feed the network the same bits."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    return (x - mean) / std


def load_image(
    path: PathLike | Image.Image,
    image_size: SizeLike = 256,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> torch.Tensor:
    """Read an image as a normalised ``(3, H, W)`` float32 tensor.

    The image (a path or a PIL image) is converted to RGB (grayscale is repeated over the three
    channels, 16-bit images are scaled by 65535), resized to ``image_size`` (an int, or
    ``(height, width)``) with PIL's bilinear filter, scaled to [0, 1] and normalised as
    ``(x - mean) / std`` per channel. ``mean=None, std=None`` skips the normalisation.
    ``image_size=None`` keeps the file's own size (what tiling cuts its tiles from).
    """
    size = None if image_size is None else size_hw(image_size)
    mean, std = norm_stats(mean, std)
    if isinstance(path, Image.Image):
        arr = to_rgb_float01(path, path.size if size is None else (size[1], size[0]))
    else:
        with Image.open(path) as im:
            arr = to_rgb_float01(im, im.size if size is None else (size[1], size[0]))
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if mean is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        x = normalise_pixels(x, m, s)
    return x


#: How a ground-truth mask is brought to the image size: ``"nearest"`` (ours: any non-zero pixel
#: of the original is anomalous, resized by nearest neighbour, so no anomalous region is lost or
#: grown) or ``"bilinear"`` (the authors' code: the 8-bit mask resized bilinearly, then > 0.5 of
#: full scale; thin regions can vanish at 1024 -> 256).
MASK_RESIZES = ("nearest", "bilinear")
#: How masks are resized unless told otherwise: any non-zero pixel stays anomalous.
DEFAULT_MASK_RESIZE = MASK_RESIZES[0]


def check_mask_resize(mode: str) -> str:
    """``mode`` if it is one of :data:`MASK_RESIZES`, else a ValueError naming the choices."""
    if mode not in MASK_RESIZES:
        raise ValueError(f"mask resize must be one of {MASK_RESIZES}, got {mode!r}")
    return mode


def load_mask(path: PathLike | None, image_size: SizeLike = 256, resize: str = "nearest") -> torch.Tensor:
    """Read a ground-truth mask as a ``(1, H, W)`` float32 tensor of 0s and 1s.

    ``resize="nearest"``: any non-zero pixel (in any channel) is anomalous, and the binary mask is
    resized with nearest neighbour. ``resize="bilinear"``: the mask's 8-bit values (the maximum
    over channels) are resized bilinearly and a pixel is anomalous above 127.5 (0.5 of 255), as
    the authors' code does. ``path=None`` gives an all-zero mask (a normal image).
    ``image_size=None`` keeps the mask file's own size (not with ``path=None``).
    """
    check_mask_resize(resize)
    if path is None:
        h, w = size_hw(image_size)
        return torch.zeros(1, h, w)
    with Image.open(path) as im:
        arr = np.asarray(im)
    h, w = arr.shape[:2] if image_size is None else size_hw(image_size)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if resize == "bilinear":
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        gray = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if gray.size != (w, h):
            gray = gray.resize((w, h), Image.BILINEAR)
        return torch.from_numpy((np.asarray(gray) > 127.5).astype(np.float32))[None]
    binary = Image.fromarray((arr > 0).astype(np.uint8) * 255)
    if binary.size != (w, h):
        binary = binary.resize((w, h), Image.NEAREST)
    m = np.asarray(binary) > 127
    return torch.from_numpy(m.astype(np.float32))[None]


def decode_image(path: PathLike, image_size: SizeLike) -> torch.Tensor:
    """Read ``path`` resized to ``image_size`` as a (3, H, W) tensor, before normalisation
    (:func:`ckaad_fast.pixels.decode_pixels`): uint8 for 8-bit images (a quarter of the bytes to
    move between processes and to the GPU), float32 in [0, 1] for 16-bit and float ones. Either,
    divided by 255 (uint8) and normalised, equals :func:`load_image` exactly: the same PIL
    conversion and bilinear resize, then the same float32 arithmetic. ``image_size=None`` keeps
    the file's own size."""
    return torch.from_numpy(decode_pixels(path, image_size))
