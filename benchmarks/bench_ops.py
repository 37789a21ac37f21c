"""How fast are the fused ops against what a user would otherwise run?

At the feature shapes of WideResNet50 layers 1-3 for 256x256 images (256x64x64, 512x32x32,
1024x16x16), batch 16, float32, in one run on the same inputs:

- anomaly_map against (a) the reference code's pipeline (torch cosine_similarity + interpolate,
  then scipy's gaussian_filter on the CPU, one image at a time), (b) the same composed of eager
  PyTorch ops over the batch (a separable conv blur), (c) torch.compile of (b), and (d) the memory
  floor: one read of both feature sets and one write of the maps (best of the repeats).
- the losses, forward + backward (the gradients returned, as in a training step, not accumulated
  into .grad), against eager autograd through the same formulas, torch.compile of those, and the
  memory floor: one read of every input and one write of every gradient.

Expected before measuring (CPU, 2 cores): the reference pipeline ~22 ms/image (an earlier design estimate); the
floor ~0.5-0.7 ms; our CPU path reads the features once in cache-sized slabs, so ~1 ms, i.e.
>= 15x the reference and within 2x of the floor. On a GPU: >= 70% of a device copy's bandwidth.
With the native CPU kernels (kernels/cpu_kernels.c, 2026-12-07): the cosine maps at ~1.1x the
read-once time plus ~0.11 ms of upsampling and blur, so ~1.4x the floor; the discriminator loss
one C pass per direction plus autograd's bookkeeping, ~0.2 ms against ~0.4 ms compiled (2x).
Each ckaad_fast row is also timed on its PyTorch path (backend 'torch'), the route without them.

Run: ``python -m benchmarks.bench_ops [--quick] [--device cuda]``.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

import ckaad_fast.ops as ops
from benchmarks import baselines
from benchmarks.common import (best_of_rounds, check_agreement, feature_bench_parser, max_abs_diff, median_time,
                               memory_floor, peak_memory, print_table, save_rows)

WRN50_SHAPES = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
QUICK_SHAPES = [(16, 16, 16), (32, 8, 8), (64, 4, 4)]


def reference_pipeline(fs_list, ft_list, out_size: int, sigma: float = 4.0):
    """The reference code's scoring: per image, cosine + interpolate, then scipy's blur."""
    maps = []
    for i in range(fs_list[0].shape[0]):
        total = 0
        for fs, ft in zip(fs_list, ft_list):
            m = 1 - F.cosine_similarity(fs[i:i + 1], ft[i:i + 1])
            total = total + F.interpolate(m.unsqueeze(1), size=out_size, mode="bilinear", align_corners=True)[0, 0]
        maps.append(scipy.ndimage.gaussian_filter(total.cpu().numpy(), sigma=sigma))
    return np.stack(maps)


def make_inputs(shapes, batch, device, dtype, sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sets):
        fs = [torch.randn(batch, *s, generator=g).to(device=device, dtype=dtype) for s in shapes]
        ft = [f + 0.3 * torch.randn(f.shape, generator=g).to(device=device, dtype=dtype) for f in fs]
        out.append((fs, ft))
    return out


def bench_anomaly_map(args, device):
    shapes = QUICK_SHAPES if args.quick else WRN50_SHAPES
    batch, out_size = (2, 64) if args.quick else (args.batch, 256)
    sets = make_inputs(shapes, batch, device, torch.float32, args.sets)
    feat_bytes = sum(2 * f.numel() * f.element_size() for f in sets[0][0])
    taps = baselines.gaussian_taps(4.0, device=device)
    reps = 2 if args.quick else args.repeats

    def t(fn):
        return median_time(lambda i: fn(*sets[i]), device=device, repeats=reps, rotate=len(sets)) / batch

    # The least any implementation moves: one read of both feature sets, one write of the maps.
    floor = memory_floor([(fs + ft, [torch.empty(batch, out_size, out_size, device=device)]) for fs, ft in sets],
                         device=device, repeats=reps) / batch
    cl_sets = [([f.contiguous(memory_format=torch.channels_last) for f in fs],
                [f.contiguous(memory_format=torch.channels_last) for f in ft]) for fs, ft in sets]
    def torch_path(fs, ft):
        with ops.backend("torch"):
            return ops.anomaly_map(fs, ft, out_size=out_size)

    paths = {
        "anomaly_map (ckaad_fast)": lambda fs, ft: ops.anomaly_map(fs, ft, out_size=out_size),
        "anomaly_map (ckaad_fast, PyTorch path)": torch_path,
        "anomaly_map (ckaad_fast), channels_last features": lambda fs, ft: ops.anomaly_map(
            *cl_sets[0 if fs is sets[0][0] else 1], out_size=out_size),
        "reference pipeline (per image, scipy blur)": lambda fs, ft: reference_pipeline(fs, ft, out_size),
        "eager PyTorch over the batch": lambda fs, ft: baselines.anomaly_map(fs, ft, out_size, taps),
    }
    if not args.no_compile:
        compiled = torch.compile(baselines.anomaly_map)
        paths["torch.compile of the eager composition"] = lambda fs, ft: compiled(fs, ft, out_size, taps)
    # Same semantics as the reference (scipy's border), so the maps must agree to float32 rounding.
    check_agreement("anomaly_map vs the reference pipeline",
                    max_abs_diff(paths["anomaly_map (ckaad_fast)"](*sets[0]), reference_pipeline(*sets[0], out_size)),
                    1e-4)
    times = best_of_rounds({name: (lambda fn=fn: t(fn)) for name, fn in paths.items()}, args.rounds)
    times["read both feature sets, write the maps (floor)"] = floor
    ours = times["anomaly_map (ckaad_fast)"]
    # Peak memory of one batch beyond the inputs (the output maps alone: batch x out^2 x 4 bytes).
    mem = {name: peak_memory(lambda fn=fn: fn(*sets[0]), device) for name, fn in paths.items()}
    mem["read both feature sets, write the maps (floor)"] = batch * out_size * out_size * 4 / 2**20
    rows = [(name, tb * 1e3, tb / ours, feat_bytes / batch / tb / 1e9, mem[name]) for name, tb in times.items()]
    print_table(
        f"anomaly_map, {len(shapes)} layers {shapes}, batch {batch}, float32, out {out_size}, device {device}",
        ["path", "ms / image", "time / ours", "GB/s of features", "peak MiB per batch"],
        rows,
    )
    return [
        {"bench": "anomaly_map", "path": r[0], "ms_per_image": f"{r[1]:.4f}", "ratio_to_ours": f"{r[2]:.3f}",
         "gbps": f"{r[3]:.2f}", "peak_mib": f"{r[4]:.1f}", "batch": batch, "shapes": str(shapes)}
        for r in rows
    ]


def _check_loss(name, ours_fn, eager_fn, inputs) -> None:
    """The fused loss and its gradients against eager autograd through the same formula."""
    leaves = [x for group in inputs for x in group]
    results = []
    for fn in (ours_fn, eager_fn):
        loss = fn(*inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    (l_ours, g_ours), (l_eager, g_eager) = results
    diff = max([max_abs_diff(l_ours, l_eager)] + [max_abs_diff(a, b) for a, b in zip(g_ours, g_eager)])
    check_agreement(f"{name} (value and gradients) vs eager autograd", diff, 1e-4)


def bench_losses(args, device):
    shapes = QUICK_SHAPES if args.quick else WRN50_SHAPES
    batch = 2 if args.quick else args.batch
    reps = 2 if args.quick else args.repeats
    sets = make_inputs(shapes, batch, device, torch.float32, args.sets, seed=1)
    sets = [([x.requires_grad_(True) for x in xs], [y.requires_grad_(True) for y in ys]) for xs, ys in sets]
    g = torch.Generator().manual_seed(2)
    # Three score tensors per layer (normal, anomalous, generated inputs), distinct as in training:
    # passing one tensor thrice would time autograd summing its three gradients too.
    score_sets = [tuple([(6 * torch.randn(batch, 1, s[1], s[2], generator=g)).to(device).requires_grad_(True)
                         for s in shapes] for _ in range(3)) for _ in range(args.sets)]

    def fwd_bwd(loss_fn, inputs):
        # The gradients are returned, not accumulated into .grad: in a training step they are
        # intermediate (they flow on into the networks), so nobody adds them to a stored tensor.
        torch.autograd.grad(loss_fn(*inputs), [x for group in inputs for x in group])

    def t(fn, inputs):
        return median_time(lambda i: fwd_bwd(fn, inputs[i]), device=device, repeats=reps, rotate=len(inputs))

    rows = []
    for name, ours_fn, eager_fn, inputs in [
        ("cosine_reconstruction_loss", ops.cosine_reconstruction_loss, baselines.reconstruction_loss, sets),
        ("discriminator_loss", ops.discriminator_loss, baselines.discriminator_loss, score_sets),
    ]:
        _check_loss(name, ours_fn, eager_fn, inputs[0])
        # The least any implementation moves: one read of every input, one write of every gradient.
        leaves = [[x.detach() for group in inp for x in group] for inp in inputs]
        floor = memory_floor([(xs, [torch.empty_like(x) for x in xs]) for xs in leaves], device=device, repeats=reps)
        def torch_path(*args, fn=ours_fn):
            with ops.backend("torch"):
                return fn(*args)

        timers = {"ours": lambda: t(ours_fn, inputs), "torch_path": lambda: t(torch_path, inputs),
                  "eager": lambda: t(eager_fn, inputs)}
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = torch.compile(eager_fn)
            timers["compiled"] = lambda: t(compiled, inputs)
        times = best_of_rounds(timers, args.rounds)
        mem = [peak_memory(lambda fn=fn: fwd_bwd(fn, inputs[0]), device) for fn in (ours_fn, eager_fn)]
        rows.append((name, times["ours"] * 1e3, times["eager"] * 1e3, times.get("compiled", math.nan) * 1e3,
                     times["eager"] / times["ours"], times.get("compiled", math.nan) / times["ours"],
                     floor * 1e3, 100 * floor / times["ours"], mem[0], mem[1], times["torch_path"] * 1e3))
    print_table(
        f"losses, forward + backward, {shapes}, batch {batch}, float32, device {device}",
        ["loss", "ckaad_fast ms", "eager autograd ms", "torch.compile ms", "eager / ours", "compiled / ours",
         "floor ms (read inputs, write grads)", "ours % of floor", "ours peak MiB", "eager peak MiB",
         "ckaad_fast PyTorch path ms"],
        rows,
    )
    return [{"bench": "loss_fwd_bwd", "path": r[0], "ms": f"{r[1]:.4f}", "eager_ms": f"{r[2]:.4f}",
             "compiled_ms": f"{r[3]:.4f}", "speedup": f"{r[4]:.3f}", "speedup_vs_compiled": f"{r[5]:.3f}",
             "floor_ms": f"{r[6]:.4f}", "pct_of_floor": f"{r[7]:.2f}", "peak_mib": f"{r[8]:.1f}",
             "eager_peak_mib": f"{r[9]:.1f}", "torch_path_ms": f"{r[10]:.4f}", "batch": batch, "shapes": str(shapes)}
            for r in rows]


def main(argv=None):
    parser = feature_bench_parser(__doc__.split("\n\n")[0], "ops")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    device = torch.device(args.device)
    rows = bench_anomaly_map(args, device) + bench_losses(args, device)
    save_rows("ops", rows, args, device)
    return rows


if __name__ == "__main__":
    main()
