"""The CKAAD reference code: swap its ``cal_anomaly_map`` (util/test.py) for ckaad_fast's.

Before, in ``evaluation_pixel`` / ``evaluation_semantic``:

    anomaly_map = cal_anomaly_map(inputs, outputs, img.shape[-1], amap_mode='add')

After, one line changed (same arguments, same float32 (B, H, W) NumPy array):

    from ckaad_fast.dropin import ckaad_cal_anomaly_map as cal_anomaly_map

The original adds (or multiplies) the batch's upsampled cosine-error maps with torch, copies them
to the CPU and blurs each image with scipy's gaussian_filter(sigma=4); the drop-in runs the fused
cosine, upsampling and blur on the features' device over the whole batch ('reflect' border,
as scipy). Training: its ``loss_function(inputs, outputs)`` is ``cosine_distillation_loss``.

A tiny randomly initialised encoder and auto-encoder stand in for the networks:
``python examples/ckaad_reference_swap.py`` runs in a few seconds.
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from _tiny import TinyFeatureReconstructor, best_of
from ckaad_fast.dropin import ckaad_cal_anomaly_map, cosine_distillation_loss


def original_cal_anomaly_map(fs_list, ft_list, out_size=224, amap_mode="mul"):
    """The CKAAD reference's cal_anomaly_map as published: a float32 torch product, maximum or
    sum over layers of the upsampled cosine-error maps, then scipy's blur of each image."""
    batch = fs_list[0].shape[0]
    amap = (torch.ones if amap_mode == "mul" else torch.zeros)([batch, 1, out_size, out_size], device=fs_list[0].device)
    for fs, ft in zip(fs_list, ft_list):
        a_map = F.interpolate((1 - F.cosine_similarity(fs, ft)).unsqueeze(1), size=out_size, mode="bilinear", align_corners=True)
        if amap_mode == "mul":
            amap = amap * a_map
        elif amap_mode == "max":
            amap = torch.max(amap, a_map)
        else:
            amap = amap + a_map
    amap = amap.cpu().numpy()
    return np.vstack([gaussian_filter(m, sigma=4) for m in amap])


def main():
    torch.manual_seed(0)
    model = TinyFeatureReconstructor().eval()
    img = torch.rand(8, 3, 256, 256)
    with torch.no_grad():
        inputs, outputs = model(img)
    for mode in ("add", "mul", "max"):
        ref, t_before = best_of(lambda: original_cal_anomaly_map(inputs, outputs, img.shape[-1], amap_mode=mode))
        out, t_after = best_of(lambda: ckaad_cal_anomaly_map(inputs, outputs, img.shape[-1], amap_mode=mode))
        print(f"amap_mode={mode!r}, {img.shape[0]} images: before {t_before:.1f} ms, after {t_after:.1f} ms, "
              f"{t_before / t_after:.1f}x; max abs diff {np.abs(out - ref).max():.2e}; {out.dtype} {out.shape}")
    loss = cosine_distillation_loss(inputs, outputs)
    ref = sum(torch.mean(1 - F.cosine_similarity(a.view(a.shape[0], -1), b.view(b.shape[0], -1))) for a, b in zip(inputs, outputs))
    print(f"loss_function: before {ref.item():.6f}, after {loss.item():.6f}")


if __name__ == "__main__":
    main()
