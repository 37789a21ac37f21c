"""How much does the one-line swap save for each detector's scoring?

For each detector, the original scoring path (reimplemented here from the original's published
semantics, as it runs in its own evaluation loop) against the drop-in of :mod:`ckaad_fast.dropin`,
in one run on the same inputs: WideResNet50 layers 1-3 at 256x256 (256x64x64, 512x32x32,
1024x16x16), batch 16, float32.

- RD4AD / RD++ / ReContrast: ``cal_anomaly_map(..., amap_mode='a')`` one image at a time, then
  ``scipy.ndimage.gaussian_filter(sigma=4)`` per image. Drop-ins: (a) ``rd4ad_cal_anomaly_map``
  over the batch with the caller's scipy blur kept; (b) the same with ``sigma=4``, the blur inside.
- CKAAD reference: its batched ``cal_anomaly_map(..., amap_mode='add')`` (torch, then scipy per
  image) against ``ckaad_cal_anomaly_map``.
- anomalib Reverse Distillation: ``AnomalyMapGenerator`` in its default 'multiply' mode (a full
  33x33 kernel built and convolved at every call) against
  ``ReverseDistillationAnomalyMapGenerator``.

Each row also shows the drop-in's fraction of the memory floor: one read of both feature sets and
one write of the output maps, timed on the same machine.

Expected before measuring (CPU, 2 cores, an earlier design estimate): the per-image paths cost ~22 ms per
image, of which ~18 ms is the eager cosine and ~6 ms the scipy blur; the drop-in's fused cosine and
matrix-form blur should cost ~1-2 ms per image, so >= 10x where the blur moves inside, and ~3x
where the caller keeps its scipy blur (which then dominates). anomalib's 33x33 convolution costs
~1.1 GFLOP per 16 images at 256x256 on top of its cosine; the separable matrix form a few percent
of that.

Run: ``python -m benchmarks.bench_dropin [--quick] [--device cuda] [--no-save]``.
"""
from __future__ import annotations


import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from benchmarks.common import (best_of_rounds, check_agreement, feature_bench_parser, max_abs_diff, median_time,
                               memory_floor, print_table, save_rows)
from ckaad_fast import dropin

WRN50_SHAPES = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
QUICK_SHAPES = [(16, 16, 16), (32, 8, 8), (64, 4, 4)]


# --------------------------------------------------------------------------------------------
# The original paths, from their published semantics
# --------------------------------------------------------------------------------------------
def _upsampled_error(fs, ft, size):
    err = (1 - F.cosine_similarity(fs, ft)).unsqueeze(1)
    return F.interpolate(err, size=size, mode="bilinear", align_corners=True)


def original_rd4ad_eval(fs_list, ft_list, out_size):
    """RD4AD's evaluation loop: per image, the float64 NumPy sum of the layers' maps, then scipy."""
    maps = []
    for i in range(fs_list[0].shape[0]):
        total = np.zeros((out_size, out_size))
        for fs, ft in zip(fs_list, ft_list):
            total += _upsampled_error(fs[i:i + 1], ft[i:i + 1], out_size)[0, 0].cpu().numpy()
        maps.append(scipy.ndimage.gaussian_filter(total, sigma=4))
    return np.stack(maps)


def dropin_rd4ad_scipy_blur(fs_list, ft_list, out_size):
    amap, _ = dropin.rd4ad_cal_anomaly_map(fs_list, ft_list, out_size, amap_mode="a")
    return np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in amap.reshape(-1, out_size, out_size)])


def dropin_rd4ad_blur_inside(fs_list, ft_list, out_size):
    amap, _ = dropin.rd4ad_cal_anomaly_map(fs_list, ft_list, out_size, amap_mode="a", sigma=4)
    return amap.reshape(-1, out_size, out_size)


def original_ckaad(fs_list, ft_list, out_size):
    """The CKAAD reference's cal_anomaly_map('add'): batched torch sum, then scipy per image."""
    total = torch.zeros([fs_list[0].shape[0], 1, out_size, out_size], device=fs_list[0].device)
    for fs, ft in zip(fs_list, ft_list):
        total += _upsampled_error(fs, ft, out_size)
    total = total.cpu().numpy()
    return np.vstack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in total])


def original_anomalib(student, teacher, image_size, sigma=4):
    """anomalib's AnomalyMapGenerator('multiply'): the product, then a full 2-D Gaussian kernel
    built at every call and convolved after F.pad 'reflect'."""
    amap = torch.ones([student[0].shape[0], 1, *image_size], device=student[0].device)
    for s, t in zip(student, teacher):
        amap *= _upsampled_error(s, t, image_size)
    k = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(k, dtype=torch.float32, device=amap.device) - k // 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    g = g / g.sum()
    kernel = torch.outer(g, g)
    kernel = (kernel / kernel.sum()).view(1, 1, k, k)
    r = k // 2
    return F.conv2d(F.pad(amap, (r, r, r, r), mode="reflect"), kernel)


# --------------------------------------------------------------------------------------------
def make_inputs(shapes, batch, device, sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sets):
        fs = [torch.randn(batch, *s, generator=g).to(device) for s in shapes]
        ft = [f + 0.3 * torch.randn(f.shape, generator=g).to(device) for f in fs]
        out.append((fs, ft))
    return out


def run(args, device):
    shapes = QUICK_SHAPES if args.quick else WRN50_SHAPES
    batch, size = (2, 64) if args.quick else (args.batch, 256)
    reps = 2 if args.quick else args.repeats
    sets = make_inputs(shapes, batch, device, args.sets)
    generator = dropin.ReverseDistillationAnomalyMapGenerator((size, size), sigma=4, mode="multiply")

    cases = [
        ("RD4AD / RD++ / ReContrast: cal_anomaly_map swapped, scipy blur kept",
         lambda fs, ft: original_rd4ad_eval(fs, ft, size), lambda fs, ft: dropin_rd4ad_scipy_blur(fs, ft, size)),
        ("RD4AD / RD++ / ReContrast: cal_anomaly_map(sigma=4), blur inside",
         lambda fs, ft: original_rd4ad_eval(fs, ft, size), lambda fs, ft: dropin_rd4ad_blur_inside(fs, ft, size)),
        ("CKAAD reference cal_anomaly_map ('add')",
         lambda fs, ft: original_ckaad(fs, ft, size), lambda fs, ft: dropin.ckaad_cal_anomaly_map(fs, ft, size, "add")),
        ("anomalib RD AnomalyMapGenerator ('multiply')",
         lambda fs, ft: original_anomalib(fs, ft, (size, size)), lambda fs, ft: generator(fs, ft)),
    ]
    # Every detector reads both feature sets and writes one map per image: the floor for all rows.
    floor = memory_floor([(fs + ft, [torch.empty(batch, size, size, device=device)]) for fs, ft in sets],
                         device=device, repeats=reps) / batch
    rows, csv_rows = [], []
    with torch.no_grad():
        for name, original, ours in cases:
            # float32 maps of values up to a few units: rounding, not a different result.
            diff = check_agreement(name, max_abs_diff(original(*sets[0]), ours(*sets[0])), 1e-4)
            times = best_of_rounds({
                "original": lambda: median_time(lambda i: original(*sets[i]), device=device, repeats=reps, rotate=len(sets)),
                "ours": lambda: median_time(lambda i: ours(*sets[i]), device=device, repeats=reps, rotate=len(sets)),
            }, args.rounds)
            t_orig, t_ours = times["original"] / batch, times["ours"] / batch
            rows.append((name, t_orig * 1e3, t_ours * 1e3, t_orig / t_ours, 100 * floor / t_ours, diff))
            csv_rows.append({"bench": "dropin", "path": name, "original_ms_per_image": f"{t_orig * 1e3:.4f}",
                             "dropin_ms_per_image": f"{t_ours * 1e3:.4f}", "speedup": f"{t_orig / t_ours:.3f}",
                             "floor_ms_per_image": f"{floor * 1e3:.4f}", "pct_of_floor": f"{100 * floor / t_ours:.2f}",
                             "max_abs_diff": f"{diff:.3e}", "batch": batch, "out_size": size, "shapes": str(shapes)})
    print_table(
        f"drop-in scoring, {len(shapes)} layers {shapes}, batch {batch}, float32, out {size}, device {device}; "
        f"floor (read the features, write the map) {floor * 1e3:.3g} ms / image",
        ["detector", "original ms / image", "drop-in ms / image", "speed-up", "drop-in % of floor", "max abs diff"],
        rows,
    )
    return csv_rows


def main(argv=None):
    args = feature_bench_parser(__doc__.split("\n\n")[0], "dropin").parse_args(argv)
    if args.quick:
        args.rounds = 1
    device = torch.device(args.device)
    rows = run(args, device)
    save_rows("dropin", rows, args, device)
    return rows


if __name__ == "__main__":
    main()
