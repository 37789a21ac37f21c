"""How many images per second does the Scorer score, against the reference code's scoring path?

Side by side in one run, on the same model and the same inputs:

- **reference**: what the CKAAD / RD4AD reference code runs at test time: the model in eager
  float32 (backbone + auto-encoder over the batch), then per image ``1 - F.cosine_similarity``
  per layer, ``F.interpolate(bilinear, align_corners=True)``, the sum, ``.cpu()`` and
  ``scipy.ndimage.gaussian_filter(sigma=4)``, and the mean of the top-k values in numpy;
- **Scorer** configurations: eager float32; and on a GPU bf16 autocast, + ``torch.compile``,
  + CUDA graphs (channels_last throughout);
- on the CPU, the **runtime engines** behind the same Scorer (ONNX Runtime, OpenVINO in float32
  and, with bfloat16 units, bfloat16) and **int8** (calibrated with ``precision="int8"`` on the
  benchmark's inputs, the auto-encoder or the whole network quantized), each with its largest
  score difference from the reference (the parity column; int8's is its quantization error);
- **Scorer.score_paths**: the whole stream from PNG files (decoding on worker processes, pinned
  memory, non-blocking copies), i.e. what ``ckaad-fast score`` sustains.

Models: resnet18 layers 2-3 at 256x256 on the CPU (random weights: speed does not depend on
them), and on CUDA also wide_resnet50_2 layers 1-3 at 256x256. Target on one H200 for
wide_resnet50_2/256 bf16 + compile + CUDA graphs: >= 2,000 images/s and >= 20x the reference.

Expected before measuring (CPU, 2 cores, resnet18/256): the backbone and the auto-encoder cost
~100+ ms per image and dominate; the reference's post-processing adds ~5-10 ms per image (scipy's
33-tap blur of a 256x256 map, 2 cosines, 2 interpolations), ours well under 1 ms: a speed-up of
only ~1.05-1.2x on the CPU, where the network is the bottleneck. On a GPU the reference is bound
by its per-image CPU blur (~3-6 ms per image, i.e. < 300 images/s), while the Scorer is bound by
the network's FLOPs (~2x 23 GFLOP per WRN50 image with the auto-encoder, at a few hundred
TFLOP/s in bf16): several thousand images/s.

Run: ``python -m benchmarks.bench_scoring [--quick] [--device cuda] [--batch N] [--no-compile]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.common import (check_agreement, count_flops, matmul_ceiling, max_abs_diff, median_time, peak_memory,
                               print_table, save_rows)
from ckaad_fast.model import ModelConfig
from ckaad_fast.precision import cpu_has_bf16_matmul
from ckaad_fast.training import CKAAD
from ckaad_fast.scoring import Scorer

TARGET_IPS = 2000.0
TARGET_SPEEDUP = 20.0


def build_model(backbone: str, layers, size: int, topk: int = 100) -> CKAAD:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = CKAAD(ModelConfig(backbone=backbone, layers=tuple(layers), image_size=size, topk=topk,
                                  strategy="recon"), weights="none")
    return model.eval()


def reference_post(feats, recon, i: int, out_size: int, topk: int, sigma: float = 4.0):
    """One image's map and score as the reference code (RD4AD's ``cal_anomaly_map``, reused by
    CKAAD) computes them: per layer ``1 - cosine_similarity`` and ``F.interpolate`` on the model's
    device, each copied to the CPU and summed into a float64 numpy map, then scipy's blur and the
    top-k mean in numpy."""
    amap = np.zeros((out_size, out_size))
    for fs, ft in zip(feats, recon):
        m = 1 - F.cosine_similarity(fs[i:i + 1], ft[i:i + 1])
        m = F.interpolate(m.unsqueeze(1), size=out_size, mode="bilinear", align_corners=True)
        amap += m[0, 0].float().cpu().numpy()
    amap = scipy.ndimage.gaussian_filter(amap, sigma=sigma)
    flat = amap.ravel()
    return float(np.mean(np.partition(flat, flat.size - topk)[-topk:])), amap


def reference_path(model: CKAAD, x: torch.Tensor, topk: int, sigma: float = 4.0):
    """The reference code's test-time scoring: the eager float32 model over the batch (generous:
    the reference code runs batch size 1), then :func:`reference_post` for each image."""
    with torch.no_grad():
        feats = model.backbone(x)
        recon = model.autoencoder(feats)
        out = [reference_post(feats, recon, i, x.shape[-1], topk, sigma) for i in range(x.shape[0])]
    return np.array([s for s, _ in out]), np.stack([m for _, m in out])


def bench_post(args, device, backbone, layers, size) -> list[dict]:
    """Where the time goes: the post-processing alone (cosine, upsampling, blur, top-k) on the
    same features, per image: the reference's against the fused ops."""
    import ckaad_fast.ops as ops

    model = build_model(backbone, layers, size).to(device)
    topk = model.config.topk
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        feats = model.backbone(x)
        recon = model.autoencoder(feats)
    reps = 1 if args.quick else args.repeats

    def ours(_):
        with torch.no_grad():
            ops.image_score(ops.anomaly_map(feats, recon, out_size=size, sigma=4.0), topk)

    def ref(_):
        with torch.no_grad():
            for i in range(args.batch):
                reference_post(feats, recon, i, size, topk)

    with torch.no_grad():
        ours_scores = ops.image_score(ops.anomaly_map(feats, recon, out_size=size, sigma=4.0), topk)
        ref_scores = [reference_post(feats, recon, i, size, topk)[0] for i in range(args.batch)]
    check_agreement("post-processing scores vs the reference", max_abs_diff(ours_scores, ref_scores), 1e-4)
    t_ours = median_time(ours, device=device, warmup=2, repeats=reps + 2)
    t_ref = median_time(ref, device=device, warmup=1, repeats=reps)
    rows = [("reference: per-image cosine + interpolate + .cpu() + scipy blur (float64) + top-k", t_ref / args.batch * 1e3, 1.0),
            ("ckaad_fast.ops: anomaly_map + image_score over the batch", t_ours / args.batch * 1e3, t_ref / t_ours)]
    print_table(f"post-processing only, {backbone} layers {list(layers)} features, {size}x{size}, batch {args.batch}, device {device}",
                ["path", "ms / image", "speed-up"], rows)
    return [{"bench": "scoring_post", "model": backbone, "layers": "-".join(map(str, layers)), "size": size,
             "batch": args.batch, "path": r[0], "ms_per_image": f"{r[1]:.4f}", "speedup": f"{r[2]:.3f}"} for r in rows]


def _write_pngs(folder: str, n: int, size: int, seed: int = 0) -> list[str]:
    """Smooth random RGB images (they compress and decode like photographs, unlike noise)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        p = os.path.join(folder, f"{i:05d}.png")
        img.save(p)
        paths.append(p)
    return paths


class _Normal:
    """The benchmark's input images as a calibration set of normal images: ``(image, 0, path)``."""

    def __init__(self, inputs):
        self.images = [x for batch in inputs for x in batch]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0, f"input{i}"


def _scorer(model, device, batch, inputs, kw) -> Scorer:
    """The Scorer of a configuration; ``int8_scope`` in it: calibrated in int8 first (quantized
    on the benchmark's own inputs, which is all a speed and score-change row needs)."""
    kw = dict(kw)
    scope = kw.pop("int8_scope", None)
    if scope is not None:
        from ckaad_fast.calibration import calibrate

        normal = _Normal(inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw["calibration"] = calibrate(model, normal, target_fpr=1.0 / len(normal), precision="int8",
                                          engine="openvino", int8_scope=scope, batch_size=batch)
    return Scorer(model, device=device, batch_size=batch, **kw)


def _peak(peaks: dict, path: str) -> float:
    """The peak memory measured for a row (the reference's row starts with 'reference'), or NaN."""
    return peaks.get("reference" if path.startswith("reference") else path, float("nan"))


def _runtime_rows(backbone, layers, size, batch, reps, inputs, t_ref, model, quick: bool) -> list[tuple]:
    """The exported graph (ckaad-fast export) in ONNX Runtime's CPU provider and in OpenVINO's CPU
    plugin (float32), on the same images as uint8 (the graph normalises them itself), each checked
    against the eager model on the very same pixels. A runtime that is not installed gets a note."""
    try:
        from ckaad_fast.export import export
        from ckaad_fast.model import save_checkpoint
    except ImportError as e:
        return [("exported graph", float("nan"), float("nan"), float("nan"), f"skipped: {e}")]
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    # The reference's inputs as the uint8 pixels they stand for.
    u8 = [((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).numpy() for x in inputs]
    with torch.no_grad():
        eager = model((torch.from_numpy(u8[0]).float() / 255.0 - mean) / std)[0].numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(os.path.join(tmp, "m.pt"), model)
        runtimes = [("ONNX Runtime, CPU provider (ckaad-fast export)", "onnx", _ort_session),
                    ("OpenVINO, CPU plugin, f32 (ckaad-fast export --format openvino)", "openvino", _openvino_session)]
        if not quick:  # a C++ compilation of a minute or more: full runs only
            runtimes.append(("AOTInductor package, CPU (ckaad-fast export --format pt2)", "pt2", _pt2_runner))
        for name, fmt, load in runtimes:
            try:
                run = load(export(os.path.join(tmp, "m.pt"), os.path.join(tmp, fmt), fmt, batch=batch))
            except Exception as e:  # noqa: BLE001 - a missing runtime must not hide the other rows
                rows.append((name, float("nan"), float("nan"), float("nan"), f"skipped: {type(e).__name__}: {e}"[:120]))
                continue
            t = median_time(lambda i: run(u8[i]), warmup=2, repeats=reps + 2, rotate=2)
            rel = float(np.max(np.abs(run(u8[0]) - eager) / np.abs(eager)))
            check_agreement(f"{name} scores vs the eager model on the same uint8 images (relative)", rel, 1e-4)
            rows.append((name, batch / t, t_ref / t, rel, f"batch {batch}"))
    return rows


def _ort_session(path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["score"], {"image": x})[0]


def _pt2_runner(path):
    runner = torch._inductor.aoti_load_package(str(path))
    return lambda x: runner(torch.from_numpy(x))[0].numpy()


def _openvino_session(path):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled.output("score")
    return lambda x: compiled(x)[out]


def bench_model(args, device: torch.device, backbone: str, layers, size: int, configs) -> list[dict]:
    batch = args.batch
    reps = 1 if args.quick else args.repeats
    model = build_model(backbone, layers, size)
    topk = model.config.topk
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
    dev_inputs = [x.to(device) for x in inputs]

    # The reference, on the same device (float32, contiguous, as the reference code runs).
    ref_model = build_model(backbone, layers, size).to(device)
    t_ref = median_time(lambda i: reference_path(ref_model, dev_inputs[i], topk), device=device,
                        warmup=1, repeats=reps, rotate=2)
    ref_scores, _ = reference_path(ref_model, dev_inputs[0], topk)
    peaks = {"reference": peak_memory(lambda: reference_path(ref_model, dev_inputs[0], topk), device)}
    ref_model = None  # free its memory before the Scorer's models are built
    rows = [("reference (eager fp32, per-image cosine + interpolate + scipy blur)", batch / t_ref, 1.0, 0.0, "")]

    for name, kw in configs:
        try:
            t0 = time.perf_counter()
            scorer = _scorer(build_model(backbone, layers, size), device, batch, inputs, kw)
            s, _ = scorer(dev_inputs[0])  # compiles / captures here
            setup = time.perf_counter() - t0
            t = median_time(lambda i: scorer(dev_inputs[i]), device=device, warmup=2, repeats=reps + 2, rotate=2)
            peaks[name] = peak_memory(lambda: scorer(dev_inputs[0]), device)
            s, _ = scorer(dev_inputs[0])
            rel = float(np.max(np.abs(s.float().cpu().numpy() - ref_scores) / np.abs(ref_scores)))
            if not any(p in name for p in ("bf16", "fp16", "int8")):  # float32 configurations: the same scores
                # (On a GPU cuDNN's TF32 convolutions differ by layout: a looser bound there.)
                check_agreement(f"{name} scores vs the reference", max_abs_diff(s, ref_scores),
                                1e-4 if device.type == "cpu" else 1e-2)
            # What really ran (OpenVINO computes bf16 only where the CPU has bf16 units).
            rows.append((name, batch / t, t_ref / t, rel, f"setup {setup:.1f} s; ran {scorer.engine} {scorer.precision}"))
        except Exception as e:  # noqa: BLE001 - one failing configuration must not hide the others
            rows.append((name, float("nan"), float("nan"), float("nan"), f"FAILED: {type(e).__name__}: {str(e)[:120]}"))

    if device.type == "cpu":
        rows += _runtime_rows(backbone, layers, size, batch, reps, inputs, t_ref, model, args.quick)

    # The stream from files: the PyTorch engine's (float32 on the CPU, the last, fastest
    # configuration on a GPU) and, on the CPU, the fastest runtime engine's.
    streamed = ([configs[0]] + [c for c in configs if c[0] == "Scorer fp32, engine openvino"] if device.type == "cpu"
                else [configs[-1]])
    for name, kw in ([] if args.no_stream else streamed):
        n_files = batch * (2 if args.quick else 8)
        with tempfile.TemporaryDirectory() as tmp:
            paths = _write_pngs(tmp, n_files, size)
            try:
                scorer = Scorer(build_model(backbone, layers, size), device=device, batch_size=batch, **kw)
                for _ in scorer.score_paths(paths[:batch], return_maps=False):  # warm-up / compile / capture
                    pass
                t0 = time.perf_counter()
                n = sum(1 for r in scorer.score_paths(paths, return_maps=True) if r.ok)
                dt = time.perf_counter() - t0
                rows.append((f"{name}: score_paths from PNG files (decode, copy, maps read back)", n / dt,
                             (n / dt) / (batch / t_ref), float("nan"), f"{n} files, {scorer._workers(len(paths))} workers"))
            except Exception as e:  # noqa: BLE001
                rows.append((f"{name}: score_paths", float("nan"), float("nan"), float("nan"),
                             f"FAILED: {type(e).__name__}: {str(e)[:120]}"))

    # The network's FLOPs per image against the device's matmul ceiling (in the row's dtype):
    # how far each path is from what the hardware could do.
    with torch.no_grad():
        flops = count_flops(lambda x: model.autoencoder(model.backbone(x)), inputs[0][:1])
    ceilings = {"fp32": matmul_ceiling(device, torch.float32, quick=args.quick),
                "bf16": matmul_ceiling(device, torch.bfloat16, quick=args.quick)}
    fractions = [100 * flops * r[1] / ceilings["bf16" if "bf16" in r[0] else "fp32"] for r in rows]
    print_table(
        f"scoring, {backbone} layers {list(layers)}, {size}x{size}, batch {batch}, device {device}; "
        f"network {flops / 1e9:.2f} GFLOP/image, matmul ceiling "
        + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceilings.items()),
        ["path", "images / s", "speed-up vs reference", "% of matmul ceiling", "max rel. score diff",
         "peak MiB per batch", "note"],
        [(r[0], r[1], r[2], f, r[3], _peak(peaks, r[0]), r[4]) for r, f in zip(rows, fractions)],
    )
    return [
        {"bench": "scoring", "model": backbone, "layers": "-".join(map(str, layers)), "size": size, "batch": batch,
         "path": r[0], "images_per_s": f"{r[1]:.2f}", "ms_per_image": f"{1e3 / r[1]:.4f}", "speedup": f"{r[2]:.3f}",
         "gflop_per_image": f"{flops / 1e9:.3f}", "pct_of_matmul_ceiling": f"{f:.2f}",
         "max_rel_score_diff": f"{r[3]:.2e}", "peak_mib": f"{_peak(peaks, r[0]):.1f}", "note": r[4]}
        for r, f in zip(rows, fractions)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds: CI runs this so the script cannot rot")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: 8 on the CPU, 128 on CUDA, 2 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per row, median reported (default 3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile and CUDA-graph configurations")
    parser.add_argument("--no-stream", action="store_true", help="skip the score_paths-from-files row")
    parser.add_argument("--models", default=None,
                        help="comma-separated backbones to run (default: resnet18 on the CPU, resnet18,wide_resnet50_2 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 gives stable numbers on a CPU shared with other jobs")
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="time the torch bf16 row on a CPU without bfloat16 units too (emulated, slow)")
    parser.add_argument("--no-save", action="store_true", help="do not append the rows to benchmarks/results/scoring.csv")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.batch is None:
        args.batch = 2 if args.quick else (128 if cuda else 8)
    size = 64 if args.quick else 256
    layer_sets = {"resnet18": (2, 3), "wide_resnet50_2": (1, 2, 3), "resnet50": (1, 2, 3), "efficientnet_lite0": (1, 2, 3)}
    models = args.models.split(",") if args.models else (["resnet18", "wide_resnet50_2"] if cuda and not args.quick else ["resnet18"])

    configs = [("Scorer fp32 eager", {"dtype": "float32"})]
    if cuda:
        configs.append(("Scorer bf16 eager", {"dtype": "bfloat16"}))
        if not args.no_compile:
            configs.append(("Scorer bf16 + compile", {"dtype": "bfloat16", "compile": True}))
            configs.append(("Scorer bf16 + compile + CUDA graphs", {"dtype": "bfloat16", "compile": True, "cuda_graphs": True}))
        else:
            configs.append(("Scorer bf16 + CUDA graphs", {"dtype": "bfloat16", "cuda_graphs": True}))
    else:
        # bfloat16 autocast on the CPU (channels_last): timed always, expected to pay off where the
        # CPU has bfloat16 matrix units (AMX, AVX-512 BF16), which the machine line records.
        if cpu_has_bf16_matmul() or args.emulated_bf16:
            configs.append(("Scorer bf16 autocast (CPU)", {"dtype": "bfloat16"}))
        else:  # emulated: about 12x slower than float32 (docs/BENCHMARKS.md), minutes per row
            print("no bfloat16 units on this CPU: the torch bf16 row is skipped (--emulated-bf16 to time it)")
        if not args.no_compile and not args.quick:
            # PyTorch's own faster CPU path: Inductor with freezing (weights folded into constants,
            # batch norms folded, convolution weights prepacked for oneDNN), float32.
            torch._inductor.config.freezing = True
            configs.append(("Scorer fp32 + compile (Inductor, freezing)", {"dtype": "float32", "compile": True}))
        # The runtime engines behind the same Scorer (the graph exported once and cached): what
        # engine="auto" chooses from on a CPU, and what a calibrated checkpoint is scored with.
        configs.append(("Scorer fp32, engine onnxruntime", {"dtype": "float32", "engine": "onnxruntime"}))
        if cpu_has_bf16_matmul():  # elsewhere OpenVINO computes float32 whatever it is told
            configs.append(("Scorer bf16, engine openvino", {"dtype": "bfloat16", "engine": "openvino"}))
        configs.append(("Scorer fp32, engine openvino", {"dtype": "float32", "engine": "openvino"}))
        # int8 (calibrate --dtype int8): the auto-encoder quantized (the default), then the network.
        for scope in ("autoencoder", "network"):
            configs.append((f"Scorer int8 ({scope}), engine openvino", {"int8_scope": scope}))

    rows = []
    for backbone in models:
        layers = layer_sets.get(backbone, (1, 2, 3))
        rows += bench_model(args, device, backbone, layers, size, configs)
        rows += bench_post(args, device, backbone, layers, size)

    if cuda and not args.quick:
        best = [r for r in rows if r["model"] == "wide_resnet50_2" and "CUDA graphs" in r["path"] and "score_paths" not in r["path"]]
        for r in best:
            ips, sp = float(r["images_per_s"]), float(r["speedup"])
            verdict = "PASS" if ips >= TARGET_IPS and sp >= TARGET_SPEEDUP else "FAIL"
            print(f"\ntarget (wide_resnet50_2/256, bf16 + compile + CUDA graphs): >= {TARGET_IPS:.0f} images/s and "
                  f">= {TARGET_SPEEDUP:.0f}x the reference: {ips:.0f} images/s, {sp:.1f}x -> {verdict}")
    save_rows("scoring", rows, args, device)
    return rows


if __name__ == "__main__":
    main()
