"""RD4AD, RD++ and ReContrast: swap ``cal_anomaly_map`` (and the loss) for ckaad_fast's.

Before, in the evaluation loop of RD4AD's test.py (RD++'s and ReContrast's are the same), one
image at a time:

    anomaly_map, _ = cal_anomaly_map(inputs, outputs, img.shape[-1], amap_mode='a')
    anomaly_map = gaussian_filter(anomaly_map, sigma=4)

After, one line changed (and the loop may now take whole batches):

    from ckaad_fast.dropin import rd4ad_cal_anomaly_map as cal_anomaly_map

or, with the blur moved off scipy as well:

    anomaly_map, _ = cal_anomaly_map(inputs, outputs, img.shape[-1], amap_mode='a', sigma=4)

Training: ``loss_fucntion(inputs, outputs)`` -> ``cosine_distillation_loss(inputs, outputs)``.

A tiny randomly initialised encoder/decoder stands in for the detector's networks here, so that
the script runs anywhere in a few seconds: ``python examples/rd4ad_swap.py``.
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from _tiny import TinyFeatureReconstructor, best_of
from ckaad_fast.dropin import cosine_distillation_loss, rd4ad_cal_anomaly_map


def original_cal_anomaly_map(fs_list, ft_list, out_size=224, amap_mode="mul"):
    """RD4AD's cal_anomaly_map as published (one image): float64 NumPy product or sum of the
    layers' upsampled cosine-error maps, and the list of those maps."""
    anomaly_map = np.ones([out_size, out_size]) if amap_mode == "mul" else np.zeros([out_size, out_size])
    a_map_list = []
    for fs, ft in zip(fs_list, ft_list):
        a_map = (1 - F.cosine_similarity(fs, ft)).unsqueeze(1)
        a_map = F.interpolate(a_map, size=out_size, mode="bilinear", align_corners=True)[0, 0].cpu().numpy()
        a_map_list.append(a_map)
        anomaly_map = anomaly_map * a_map if amap_mode == "mul" else anomaly_map + a_map
    return anomaly_map, a_map_list


def original_loss(a, b):
    """RD4AD's loss_fucntion: per layer, the batch mean of 1 - cos of the flattened maps."""
    return sum(torch.mean(1 - F.cosine_similarity(x.view(x.shape[0], -1), y.view(y.shape[0], -1))) for x, y in zip(a, b))


def main():
    torch.manual_seed(0)
    model = TinyFeatureReconstructor().eval()
    img = torch.rand(8, 3, 256, 256)
    with torch.no_grad():
        inputs, outputs = model(img)
    size = img.shape[-1]

    for mode in ("a", "mul"):
        def before():  # the original takes one image at a time
            maps = []
            for i in range(img.shape[0]):
                amap, _ = original_cal_anomaly_map([f[i:i + 1] for f in inputs], [f[i:i + 1] for f in outputs], size, mode)
                maps.append(gaussian_filter(amap, sigma=4))
            return np.stack(maps)

        def swap():  # one line changed: the caller still blurs with scipy
            amap, _ = rd4ad_cal_anomaly_map(inputs, outputs, size, amap_mode=mode)
            return np.stack([gaussian_filter(m, sigma=4) for m in amap])

        def swap_blur_inside():
            return rd4ad_cal_anomaly_map(inputs, outputs, size, amap_mode=mode, sigma=4)[0]

        ref, t_before = best_of(before)
        print(f"amap_mode={mode!r}, {img.shape[0]} images of {size}x{size}: before {t_before:.1f} ms")
        for name, fn in (("swap, scipy blur kept", swap), ("swap, sigma=4 inside", swap_blur_inside)):
            out, t = best_of(fn)
            print(f"  after ({name}): {t:.1f} ms, {t_before / t:.1f}x; max abs diff {np.abs(out - ref).max():.2e}; "
                  f"{out.dtype} {out.shape}")

    def train_step(loss_fn):
        outs = [f.clone().requires_grad_() for f in outputs]
        loss = loss_fn(inputs, outs)
        loss.backward()
        return loss.item(), [o.grad for o in outs]

    (l0, g0), t0 = best_of(lambda: train_step(original_loss))
    (l1, g1), t1 = best_of(lambda: train_step(cosine_distillation_loss))
    grad_diff = max((x - y).abs().max().item() for x, y in zip(g0, g1))
    print(f"loss fwd+bwd: before {l0:.6f} in {t0:.1f} ms, after {l1:.6f} in {t1:.1f} ms; max abs grad diff {grad_diff:.2e}")


if __name__ == "__main__":
    main()
