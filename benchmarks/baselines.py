"""What a user runs without the fused ops: each op's plain PyTorch formula (eager, or under
``torch.compile``), and a plain PyTorch scorer with the same networks. Every speed-up the
benchmarks and the GPU check state is against these, timed in the same run.

The formulas are the ones the field writes (RD4AD, CKAAD's and anomalib's code): per layer
``1 - F.cosine_similarity``, ``F.interpolate(bilinear, align_corners=True)``, the sum, then a
separable Gaussian as two ``conv2d`` with ``F.pad(mode='reflect')`` (scipy's 'mirror', anomalib's
border; the fused op's ``border='mirror'`` computes the same map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ckaad_fast.precision import autocast


def gaussian_taps(sigma: float = 4.0, truncate: float = 4.0, device=None) -> torch.Tensor:
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def cosine_maps(fs_list, ft_list):
    """Each layer's ``1 - cos`` over channels, in the features' dtype."""
    return [1 - F.cosine_similarity(fs, ft, dim=1) for fs, ft in zip(fs_list, ft_list)]


def anomaly_map(fs_list, ft_list, out_size: int, taps: torch.Tensor):
    """The anomaly map as plain ops over the batch, (B, out, out) float32."""
    total = 0
    for m in cosine_maps(fs_list, ft_list):
        total = total + F.interpolate(m.float().unsqueeze(1), size=out_size, mode="bilinear", align_corners=True)
    r = taps.numel() // 2
    x = F.pad(total, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    x = F.conv2d(x, taps.view(1, 1, -1, 1))
    return x[:, 0]


def upsample_blur(maps, out_size: int, taps: torch.Tensor):
    """Upsampling, sum and blur of (B, h, w) float32 maps, as plain ops."""
    total = sum(F.interpolate(m.unsqueeze(1), size=out_size, mode="bilinear", align_corners=True) for m in maps)
    r = taps.numel() // 2
    x = F.pad(total, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(x, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))[:, 0]


def reconstruction_loss(inputs, outputs):
    """Eq. 2: per layer, the batch mean of 1 - cos of the flattened maps, summed."""
    total = 0
    for x, y in zip(inputs, outputs):
        total = total + torch.mean(1 - F.cosine_similarity(y.reshape(y.shape[0], -1), x.reshape(x.shape[0], -1)))
    return total


def discriminator_loss(s_normal, s_anomalous, s_generated, gamma: float = 0.5, margin: float = 5.0):
    """Eq. 11 summed over layers; energy = |score|."""
    total = 0
    for n, a, g in zip(s_normal, s_anomalous, s_generated):
        total = (total + n.abs().mean() + (1 - gamma) * F.relu(margin - a.abs()).mean()
                 + gamma * F.relu(margin - g.abs()).mean())
    return total


def image_scores(amap: torch.Tensor, topk: int) -> torch.Tensor:
    return torch.topk(amap.reshape(amap.shape[0], -1), topk, dim=1).values.mean(1)


class PlainScorer(torch.nn.Module):
    """The same detector's networks with the head in plain PyTorch ops: what a user who skips the
    fused ops compiles (``torch.compile(mode='reduce-overhead')`` adds CUDA graphs)."""

    def __init__(self, model, dtype: torch.dtype, sigma: float = 4.0):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.out_size = int(model.config.image_size[0])
        self.topk = int(model.config.topk or 100)
        self.register_buffer("taps", gaussian_taps(sigma))

    def networks(self, x: torch.Tensor):
        with autocast(x.device, self.dtype):  # the library's (no cast cache: CUDA-graph safe)
            feats = self.model.features(x)
            recon = self.model.reconstruct(feats)
        return feats, recon

    def forward(self, x: torch.Tensor):
        feats, recon = self.networks(x)
        amap = anomaly_map(feats, recon, self.out_size, self.taps)
        return image_scores(amap, self.topk), amap


def best_compiled(fn, modes=("default", "max-autotune-no-cudagraphs")):
    """``{mode: torch.compile(fn, mode=mode)}``: the benchmarks time each and keep the best."""
    return {mode: torch.compile(fn, mode=None if mode == "default" else mode) for mode in modes}
