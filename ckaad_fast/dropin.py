"""Drop-in replacements for the scoring and the loss of other feature-reconstruction detectors.

RD4AD, RD++, ReContrast, the CKAAD reference code and anomalib's Reverse Distillation all score
an image the same way: per layer the cosine error 1 - cos(F_enc, F_dec) over channels, bilinear
upsampling with ``align_corners=True`` to the image size, a combination over layers (product or
sum) and a Gaussian blur with sigma 4. They differ in where the blur runs, in its border rule, in
dtypes and in shapes. Each function here has the signature and the return value of one original,
and runs through the fused ops of :mod:`ckaad_fast.ops` (Triton on CUDA tensors, a vectorised
PyTorch path on CPU tensors), over the whole batch at once:

==========================================  ===================================================
original                                    drop-in
==========================================  ===================================================
RD4AD / RD++ / ReContrast ``cal_anomaly_map``  :func:`rd4ad_cal_anomaly_map`
CKAAD reference ``cal_anomaly_map``         :func:`ckaad_cal_anomaly_map`
anomalib RD ``AnomalyMapGenerator``         :class:`ReverseDistillationAnomalyMapGenerator`
RD4AD ``loss_fucntion``, anomalib's         :func:`cosine_distillation_loss`
``ReverseDistillationLoss``, ReContrast's
``global_cosine`` / ``global_cosine_hm`` /
``region_cosine``
==========================================  ===================================================

Nothing here imports anomalib, scipy or any of the originals.
"""
from __future__ import annotations

import enum
import functools
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .ops import anomaly_map as _fused_anomaly_map
from .ops import cosine_reconstruction_loss, upsample_blur_sum
from .ops.checks import check_layer_lists, check_pair, check_same_batch, out_size_pair
from .ops.cosine import cosine_error_map_float32

__all__ = [
    "AnomalyMapGenerationMode",
    "ReverseDistillationAnomalyMapGenerator",
    "ckaad_cal_anomaly_map",
    "cosine_distillation_loss",
    "rd4ad_cal_anomaly_map",
]

# Every mode string that the originals' own scripts pass. The originals treat any string other than
# 'mul' as a sum (RD4AD's test.py itself passes 'acc'); here an unknown string is an error, so
# that a typo such as 'mult' does not silently turn a product into a sum.
_RD4AD_MODES = {"mul": "mul", "a": "add", "add": "add", "acc": "add"}
_CKAAD_MODES = {"mul": "mul", "max": "max", "a": "add", "add": "add"}


def _check_features(fs_list, ft_list):
    fs_list, ft_list = check_layer_lists(fs_list, ft_list, "fs_list", "ft_list")
    for i, (fs, ft) in enumerate(zip(fs_list, ft_list)):
        check_pair(fs, ft, f"fs_list[{i}]", f"ft_list[{i}]", ndim=4)
    check_same_batch(fs_list, "fs_list")
    return fs_list, ft_list


def _mode(amap_mode, table: dict, name: str) -> str:
    key = getattr(amap_mode, "value", amap_mode)
    if not isinstance(key, str) or key not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {amap_mode!r}")
    return table[key]


def _error_maps(fs_list, ft_list):
    """Per layer the (B, h, w) cosine error, float32 whatever the features' dtype (float64 stays)."""
    return [cosine_error_map_float32(fs, ft) for fs, ft in zip(fs_list, ft_list)]


def _upsampled(maps, out_hw):
    """Each (B, h, w) map upsampled bilinearly (align_corners=True) to out_hw, without blur."""
    return [upsample_blur_sum([m], out_hw, sigma=0.0) for m in maps]


def _combine(maps, mode: str) -> torch.Tensor:
    """Product, maximum or sum over layers, layer by layer in the originals' order (from 1 or 0)."""
    out = maps[0]
    if mode == "max":
        out = torch.clamp_min(out, 0)  # the originals start from zeros
    for m in maps[1:]:
        out = out * m if mode == "mul" else torch.maximum(out, m) if mode == "max" else out + m
    return out


def _blur(amap: torch.Tensor, sigma: float, border: str) -> torch.Tensor:
    """A Gaussian blur of a (B, H, W) map: 'upsampling' to its own size is the identity."""
    return upsample_blur_sum([amap], tuple(amap.shape[1:]), sigma=sigma, truncate=4.0, border=border)


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


# --------------------------------------------------------------------------------------------
# RD4AD, RD++, ReContrast
# --------------------------------------------------------------------------------------------
def rd4ad_cal_anomaly_map(fs_list, ft_list, out_size=224, amap_mode="mul", *, sigma: float = 0.0):
    """``cal_anomaly_map`` of RD4AD (``test.py``), RD++ (``utils/utils_test.py``) and ReContrast
    (``utils.py``), over a whole batch at once.

    Per layer s: ``1 - cos(fs, ft)`` over channels, bilinear upsampling (align_corners=True) to
    ``out_size`` (an int, or an (h, w) pair as ReContrast allows); the maps are multiplied
    (``amap_mode='mul'``, starting from ones) or added (``'a'``, ``'add'`` or ``'acc'``, starting
    from zeros) in float64, as the originals do in NumPy. No blur: the callers blur the result
    with ``scipy.ndimage.gaussian_filter(anomaly_map, sigma=4)``.

    Returns ``(anomaly_map, a_map_list)`` as NumPy arrays. For a batch of one, exactly the
    original's: ``anomaly_map`` float64 (H, W), ``a_map_list`` one (H, W) map per layer in the
    features' dtype (float32 for float32 features; bfloat16, which NumPy cannot hold and the
    original cannot return, gives float32). For a batch of B > 1 the same with a leading batch
    dimension, (B, H, W); the original, which takes one image at a time, would return image 0's.
    ``anomaly_map`` is exactly the float64 product (or sum) of the ``a_map_list`` entries.

    ``sigma`` (keyword-only, not in the original): when > 0, ``anomaly_map`` is also blurred as
    the callers' next line does, ``gaussian_filter(anomaly_map, sigma)`` with scipy's 'reflect'
    border, on the features' device; the per-layer maps stay unblurred.
    """
    mode = _mode(amap_mode, _RD4AD_MODES, "amap_mode")
    fs_list, ft_list = _check_features(fs_list, ft_list)
    out_hw = out_size_pair(out_size)
    sigma = _check_sigma(sigma)
    with torch.no_grad():
        errors = _error_maps(fs_list, ft_list)
        maps = _upsampled(errors, out_hw)
        list_dtype = fs_list[0].dtype if fs_list[0].dtype in (torch.float16, torch.float64) else torch.float32
        # One device-to-host copy for every layer's map.
        stacked = torch.stack(maps).to(list_dtype).cpu().numpy()
        a_map_list = list(stacked)
        if sigma > 0:
            if mode == "add":
                blurred = upsample_blur_sum(errors, out_hw, sigma=sigma, truncate=4.0, border="reflect")
            else:
                blurred = _blur(_combine(maps, "mul"), sigma, "reflect")
            anomaly_map = blurred.cpu().numpy().astype(np.float64, copy=False)
        else:
            anomaly_map = np.ones(stacked.shape[1:]) if mode == "mul" else np.zeros(stacked.shape[1:])
            for a_map in a_map_list:
                if mode == "mul":
                    anomaly_map *= a_map
                else:
                    anomaly_map += a_map
    if anomaly_map.shape[0] == 1:
        return anomaly_map[0], [m[0] for m in a_map_list]
    return anomaly_map, a_map_list


# --------------------------------------------------------------------------------------------
# CKAAD reference code
# --------------------------------------------------------------------------------------------
def ckaad_cal_anomaly_map(fs_list, ft_list, out_size=224, amap_mode="mul"):
    """``cal_anomaly_map`` of the CKAAD reference code (``util/test.py``), batched.

    Per layer: ``1 - cos(fs, ft)`` over channels, bilinear upsampling (align_corners=True) to
    ``out_size`` (an int; an (h, w) pair is also accepted). The maps are combined in the default
    float dtype (float32) over the batch: multiplied (``amap_mode='mul'``, from ones), added
    (``'add'`` or ``'a'``, from zeros) or their elementwise maximum (``'max'``, from zeros). Then
    each image's map is blurred as ``scipy.ndimage.gaussian_filter(map, sigma=4)`` does ('reflect'
    border, radius 16), here on the features' device for the whole batch.

    Returns a NumPy array (B, H, W) of the default float dtype (float32), as the original does.
    """
    mode = _mode(amap_mode, _CKAAD_MODES, "amap_mode")
    fs_list, ft_list = _check_features(fs_list, ft_list)
    out_hw = out_size_pair(out_size)
    with torch.no_grad():
        if mode == "add":
            amap = _fused_anomaly_map(fs_list, ft_list, out_hw, sigma=4.0, truncate=4.0, border="reflect")
        else:
            combined = _combine(_upsampled(_error_maps(fs_list, ft_list), out_hw), mode)
            amap = _blur(combined, 4.0, "reflect")
        return amap.to(torch.get_default_dtype()).cpu().numpy()


# --------------------------------------------------------------------------------------------
# anomalib's Reverse Distillation
# --------------------------------------------------------------------------------------------
class AnomalyMapGenerationMode(str, enum.Enum):
    """anomalib's mode names; plain strings 'add' and 'multiply' (and anomalib's own enum) work too."""

    ADD = "add"
    MULTIPLY = "multiply"


class ReverseDistillationAnomalyMapGenerator(nn.Module):
    """anomalib's reverse-distillation ``AnomalyMapGenerator``, with the same constructor and call.

    ``generator(student_features, teacher_features)``: per layer ``1 - cos`` over channels, bilinear
    upsampling (align_corners=True) to ``image_size``, multiplied (``mode='multiply'``, the default,
    from ones) or added (``'add'``, from zeros) in the default float dtype, then a Gaussian blur
    with ``sigma`` and kernel size ``2 * int(4 * sigma + 0.5) + 1``, whose 'reflect' padding (torch's
    F.pad) is scipy's 'mirror' border: the edge pixel is not repeated. Returns (B, 1, H, W) in the
    default float dtype on the features' device, differentiable.

    Where anomalib rebuilds a full 2-D kernel and runs a (2r+1)^2 convolution at every call, this
    folds interpolation and the separable blur into two small cached matrices. It also accepts
    an int ``image_size``, sizes up to the blur radius (where F.pad's 'reflect' refuses: the
    reflection then repeats as in scipy), and ``sigma=0`` (no blur; anomalib's kernel would be NaN).
    """

    def __init__(self, image_size, sigma: float = 4, mode: AnomalyMapGenerationMode | str = AnomalyMapGenerationMode.MULTIPLY):
        super().__init__()
        self.image_size = out_size_pair(image_size, "image_size")
        self.sigma = sigma
        _check_sigma(sigma)
        self.kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        key = getattr(mode, "value", mode)
        if key not in ("add", "multiply"):
            raise ValueError(f"mode must be 'multiply' or 'add', got {mode!r}")
        self.mode = AnomalyMapGenerationMode(key)

    def forward(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
        fs_list, ft_list = check_layer_lists(student_features, teacher_features, "student_features", "teacher_features")
        for i, (fs, ft) in enumerate(zip(fs_list, ft_list)):
            check_pair(fs, ft, f"student_features[{i}]", f"teacher_features[{i}]", ndim=4)
        check_same_batch(fs_list, "student_features")
        out_hw = out_size_pair(self.image_size)
        sigma = float(self.sigma)
        if self.mode == AnomalyMapGenerationMode.ADD:
            amap = _fused_anomaly_map(fs_list, ft_list, out_hw, sigma=sigma, truncate=4.0, border="mirror")
        else:
            product = _combine(_upsampled(_error_maps(fs_list, ft_list), out_hw), "mul")
            amap = _blur(product, sigma, "mirror")
        return amap.to(torch.get_default_dtype()).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, sigma={self.sigma}, mode={self.mode.value!r}"


# --------------------------------------------------------------------------------------------
# The distillation loss
# --------------------------------------------------------------------------------------------
def _scale_easy_positions(grad: torch.Tensor, keep: torch.Tensor, factor: float) -> torch.Tensor:
    return grad * torch.where(keep, 1.0, factor).to(grad.dtype)


def cosine_distillation_loss(
    encoder_features,
    decoder_features,
    *,
    per_position: bool = False,
    stop_grad: bool = False,
    hard_mining_alpha: float | None = None,
    hard_mining_factor: float = 0.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""The cosine loss of reverse distillation, summed over layers, through the fused kernels.

    Default (RD4AD's and RD++'s ``loss_fucntion``, anomalib's ``ReverseDistillationLoss``,
    ReContrast's ``global_cosine``): per layer, the batch mean of 1 - cos between the flattened
    (C·H·W) encoder and decoder maps,

    .. math:: L = \sum_s \frac{1}{B} \sum_i \big(1 - \cos(\mathrm{flat}(E^s_i), \mathrm{flat}(D^s_i))\big)

    ``per_position=True`` (ReContrast's ``region_cosine``): per layer, the mean over the batch and
    the positions of the cosine error over channels, 1 - cos(E^s[:, :, h, w], D^s[:, :, h, w]).

    ``stop_grad=True`` detaches the encoder features (ReContrast's ``global_cosine`` default and
    its ``region_cosine``). ``hard_mining_alpha`` (ReContrast's ``global_cosine_hm``): per layer,
    positions whose cosine error is below mean + alpha·std (unbiased, over the batch and the
    positions) have the decoder features' gradient multiplied by ``hard_mining_factor``; the
    loss value is unchanged. So ReContrast's ``global_cosine_hm(a, b, alpha, factor)`` is
    ``cosine_distillation_loss(a, b, stop_grad=True, hard_mining_alpha=alpha,
    hard_mining_factor=factor)``.

    ``encoder_features``, ``decoder_features``: one tensor per layer each (or one tensor),
    (B, C, H, W), any float dtype and layout. Returns a 0-d float32 tensor (float64 for float64).
    """
    enc, dec = check_layer_lists(encoder_features, decoder_features, "encoder_features", "decoder_features")
    for i, (e, d) in enumerate(zip(enc, dec)):
        check_pair(e, d, f"encoder_features[{i}]", f"decoder_features[{i}]", ndim=4 if per_position or hard_mining_alpha is not None else None)
    if hard_mining_alpha is not None and not (isinstance(hard_mining_alpha, (int, float)) and math.isfinite(hard_mining_alpha)):
        raise ValueError(f"hard_mining_alpha must be a finite number or None, got {hard_mining_alpha!r}")
    if stop_grad:
        enc = [e.detach() for e in enc]
    if hard_mining_alpha is not None:
        for e, d in zip(enc, dec):
            if not d.requires_grad:
                continue
            with torch.no_grad():
                dist = cosine_error_map_float32(e, d, eps)
                thresh = dist.mean() + hard_mining_alpha * dist.reshape(-1).std()
                # ReContrast scales where 'dist < thresh': a NaN threshold or distance scales nothing.
                keep = ~(dist < thresh).unsqueeze(1)
            d.register_hook(functools.partial(_scale_easy_positions, keep=keep, factor=float(hard_mining_factor)))
    if not per_position:
        return cosine_reconstruction_loss(enc, dec, eps)
    total = None
    for e, d in zip(enc, dec):
        loss = cosine_error_map_float32(e, d, eps).mean()
        total = loss if total is None else total + loss
    return total
