"""Plain-PyTorch references of every op: written for clarity, run in float64, the tests' oracle.

They follow the reference code of CKAAD (and RD4AD, whose scoring it shares) step by step: torch's
cosine_similarity, bilinear interpolation with align_corners=True, and scipy's gaussian_filter
applied to one image at a time on the CPU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F


def cosine_error_map(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return 1 - F.cosine_similarity(a.double(), b.double(), dim=1, eps=eps)


def cosine_reconstruction_loss(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    loss = torch.zeros((), dtype=torch.float64, device=inputs[0].device)
    for x, y in zip(inputs, outputs):
        B = x.shape[0]
        loss = loss + torch.mean(1 - F.cosine_similarity(y.double().reshape(B, -1), x.double().reshape(B, -1)))
    return loss


def energy_hinge_loss(scores: torch.Tensor, high: bool, margin: float = 5.0) -> torch.Tensor:
    energy = scores.double().abs()
    return F.relu(margin - energy).mean() if high else energy.mean()


def discriminator_loss(s_normal, s_anomalous, s_generated, gamma: float = 0.5, margin: float = 5.0) -> torch.Tensor:
    total = 0.0
    for n, a, g in zip(s_normal, s_anomalous, s_generated):
        total = (
            total
            + energy_hinge_loss(n, False, margin)
            + (1 - gamma) * energy_hinge_loss(a, True, margin)
            + gamma * energy_hinge_loss(g, True, margin)
        )
    return total


def generator_loss(s_generated) -> torch.Tensor:
    return sum(energy_hinge_loss(s, False) for s in s_generated)


def anomaly_map(fs_list, ft_list, out_size=256, sigma: float = 4.0, truncate: float = 4.0, border: str = "reflect"):
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    total = None
    for fs, ft in zip(fs_list, ft_list):
        amap = cosine_error_map(fs, ft).unsqueeze(1)
        amap = F.interpolate(amap, size=(out_h, out_w), mode="bilinear", align_corners=True)[:, 0]
        total = amap if total is None else total + amap
    if sigma == 0:
        return total
    blurred = [
        scipy.ndimage.gaussian_filter(m, sigma=sigma, truncate=truncate, mode=border)
        for m in total.cpu().numpy()
    ]
    return torch.from_numpy(np.stack(blurred)).to(total.device)


def image_score(amap: torch.Tensor, topk: int | None) -> torch.Tensor:
    flat = amap.double().reshape(amap.shape[0], -1)
    if topk is None:
        return flat.mean(1)
    return flat.sort(dim=1, descending=True).values[:, :topk].mean(1)
