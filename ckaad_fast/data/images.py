"""Reading images and masks as tensors: one conversion and resize rule for training, evaluation
and scoring, so the same file gives the same input everywhere.

Images are resized with PIL's bilinear filter (as the reference code does), converted to float in
[0, 1] and normalised with ImageNet's mean and std unless other ``mean``/``std`` are given
(``mean=None`` leaves them in [0, 1]). Masks are resized with nearest neighbour and binarised
(any non-zero pixel is anomalous).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image

from ..models.backbone import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HIGH_DEPTH_MODES", "MAX_UPSCALE", "ImageRejected", "SizeLike", "size_hw", "norm_stats",
           "minimum_source_size", "check_source_size", "check_finite", "to_rgb_float01", "load_image", "load_mask",
           "decode_image"]

PathLike = Union[str, os.PathLike]
SizeLike = Union[int, Sequence[int]]

#: PIL modes of 16-bit and float images (common for medical scans), read without clipping to 8 bits.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


#: The most an image may be enlarged to reach the model's input size, per side. A 1x1 or 8x8 file
#: stretched to 256x256 holds no detail at the scale the features see, yet it gets a score (in
#: one run, 1x1 PNGs in a calibration set pushed the threshold above every defect); so an image
#: smaller than 1/8 of the input on either side is refused, naming the minimum.
MAX_UPSCALE = 8


class ImageRejected(ValueError):
    """An image file that reads but cannot be scored meaningfully: far smaller than the model's
    input, or holding non-finite pixel values. Data sets leave it out with a warning; the scorer
    reports it in its row."""


def minimum_source_size(image_size: SizeLike) -> tuple[int, int]:
    """The smallest (height, width) of a file a model of input ``image_size`` accepts: 1/
    :data:`MAX_UPSCALE` of each side, rounded up."""
    h, w = size_hw(image_size)
    return -(-h // MAX_UPSCALE), -(-w // MAX_UPSCALE)


def check_source_size(size_wh: tuple[int, int], image_size: SizeLike) -> None:
    """:class:`ImageRejected` when an image of PIL size ``size_wh`` (width, height) is too small
    for ``image_size`` (see :data:`MAX_UPSCALE`)."""
    w, h = size_wh
    min_h, min_w = minimum_source_size(image_size)
    if w < min_w or h < min_h:
        H, W = size_hw(image_size)
        raise ImageRejected(f"the image is {w}x{h} pixels, far below the model's input of {W}x{H}: at least "
                            f"{min_w}x{min_h} is needed (enlarging more than {MAX_UPSCALE}x invents the detail a "
                            "defect would show)")


def check_finite(arr: np.ndarray) -> None:
    """:class:`ImageRejected` when ``arr`` (a float image's pixels) holds a NaN or an infinity."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        # One NaN would make the whole image NaN through the scaling: refuse it, naming why.
        raise ImageRejected(f"the image holds {int((~np.isfinite(arr)).sum())} non-finite pixel values (NaN or Inf)")


def size_hw(image_size: SizeLike) -> tuple[int, int]:
    """(height, width) of an int or an (h, w) pair; ValueError for anything else."""
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def norm_stats(mean, std) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` as float triples, or ``(None, None)`` for no normalisation."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither (mean=None, std=None: no normalisation)")
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def to_rgb_float01(im: Image.Image, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize (bilinear) and convert any PIL image to an (H, W, 3) float32 array in [0, 1].
    :class:`ImageRejected` for an image far below ``size_wh`` or with non-finite pixels."""
    check_source_size(im.size, (size_wh[1], size_wh[0]))
    mode = im.mode
    if mode in HIGH_DEPTH_MODES:
        # 16-bit / 32-bit grayscale (common for medical scans): scale to [0, 1] without clipping to
        # 8 bits first, which convert("RGB") would do.
        arr = np.asarray(im, dtype=np.float32)
        check_finite(arr)
        if mode == "F":
            peak = float(arr.max()) if arr.size else 1.0
            scale = 1.0 if peak <= 1.0 else peak
        else:
            scale = 65535.0 if (mode.startswith("I;16") or (arr.size and arr.max() > 255)) else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        f = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
        if f.size != size_wh:
            f = f.resize(size_wh, Image.BILINEAR)
        g = np.asarray(f, dtype=np.float32)
        return np.repeat(g[:, :, None], 3, axis=2)
    rgb = im.convert("RGB")
    if rgb.size != size_wh:
        rgb = rgb.resize(size_wh, Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0


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
    """Read ``path`` resized to ``image_size`` as a (3, H, W) tensor, before normalisation.

    8-bit images come back as uint8 (a quarter of the bytes to move between processes and to
    the GPU); 16-bit and float images as float32 in [0, 1]. Either, divided by 255 (uint8) and
    normalised, equals :func:`load_image` exactly: the same PIL conversion and bilinear resize,
    then the same float32 arithmetic. ``image_size=None`` keeps the file's own size.
    """
    with Image.open(path) as im:
        w, h = im.size if image_size is None else size_hw(image_size)[::-1]
        check_source_size(im.size, (h, w))
        if im.mode in HIGH_DEPTH_MODES:
            arr = to_rgb_float01(im, (w, h))
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        # An RGB file is read as it is (convert would copy it whole: 432 MB at 144 megapixels).
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.BILINEAR)
        arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
