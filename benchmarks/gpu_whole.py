"""The GPU check's sections on whole models (benchmarks/gpu_check.py): compile, CUDA graphs,
decisions and the profile.

Whole networks cannot be held to an elementwise bound: convolutions, normalisations and the
compiler's fusions each round differently. The rule here is the one the kernels follow, applied
to the whole path: against a float64 run of the same model, a path may be off by at most twice
what eager float32 PyTorch is off by, plus the bound of one float32 accumulation over the widest
layer (gpu_criteria.bound). A fused op that corrupted a gradient or a map would be off by far
more than eager PyTorch's own rounding.
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import os
import shutil
import warnings

import torch

import ckaad_fast.ops as ops
from benchmarks.gpu_criteria import bound, normwise_error
from ckaad_fast.ops import reference as ref


def _tiny_or_real(smoke):
    # (backbone, layers, image size, batch)
    return ("resnet18", (1, 2), 64, 2) if smoke else ("resnet18", (2, 3), 256, 32)


@contextlib.contextmanager
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def no_worse_than_eager(outs, eagers, truths, k: int, what: str) -> str:
    """Assert ``err(out) <= 2 err(eager) + bound(float32, k)`` for each (out, eager, float64 truth)
    triple, normwise; return the detail text."""
    details = []
    for i, (o, e, t) in enumerate(zip(outs, eagers, truths)):
        err_o, err_e = normwise_error(o, t, f"{what}[{i}]"), normwise_error(e, t, f"{what}[{i}] (eager)")
        limit = 2 * err_e + bound(torch.float32, k)
        if not err_o <= limit:
            raise AssertionError(f"{what}[{i}]: {err_o:.3g} from float64, more than 2 x eager's {err_e:.3g} + "
                                 f"{bound(torch.float32, k):.1e}")
        details.append(err_o)
    return f"{what} {max(details):.1e} from float64 (eager float32 within 2x)"


def _float64(model, x):
    """The model's (scores, maps) in float64, on the PyTorch paths: the truth the paths are held to."""
    with torch.inference_mode(), ops.backend("torch"):
        return copy.deepcopy(model).to(x.device).double()(x.double())


def _widest(model) -> int:
    return max(p.shape[1] * p[0, 0].numel() for p in model.parameters() if p.dim() == 4)


def check_compile_and_graphs(chk, device, smoke: bool, graphs: bool):
    if graphs:
        return _check_graphs(chk, device, smoke)
    from benchmarks.bench_scoring import build_model
    from ckaad_fast.training import CKAAD, TrainConfig

    backend = "aot_eager" if smoke else "inductor"
    backbone, layers, size, batch = _tiny_or_real(smoke)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5)).to(device)

    with chk.item("compile", f"scoring forward, fullgraph=True ({backend}), {backbone}/{size}") as row, no_tf32():
        torch._dynamo.reset()
        model = build_model(backbone, layers, size).to(device)
        with torch.inference_mode():
            eager = model(x)
            comp = torch.compile(model, fullgraph=True, backend=backend)(x)
            truth = _float64(model, x)
        row["detail"] = no_worse_than_eager(comp, eager, truth, _widest(model), "scores, maps")

    with chk.item("compile", f"training step, fullgraph=True ({backend}): weight gradients against float64, TF32 "
                             "off") as row, no_tf32():
        torch._dynamo.reset()
        cfg = TrainConfig(strategy="cka_patch", backbone=backbone, layers=layers, weights="none", image_size=size,
                          batch_size=batch, device=str(device))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = CKAAD(cfg.model_config(), weights="none").to(device)
        model64 = copy.deepcopy(model).double()

        def step(m, images, fused: bool):
            feats = m.features(images)
            recon = m.reconstruct(feats)
            loss = (ops.cosine_reconstruction_loss(feats, recon) if fused
                    else ref.cosine_reconstruction_loss(feats, recon))
            d = m.discriminator
            s_gen = d(recon)
            gen = ops.generator_loss(s_gen) if fused else sum(s.abs().mean() for s in s_gen)
            return loss + 0.02 * gen

        def weight_grads(m, images, fused, compiled):
            fn = torch.compile(lambda i: step(m, i, fused), fullgraph=True, backend=backend) if compiled else \
                (lambda i: step(m, i, fused))
            params = [p for p in m.autoencoder.parameters() if p.requires_grad]
            return torch.autograd.grad(fn(images), params)

        with ops.backend("torch"):
            truth = weight_grads(model64, x.double(), fused=False, compiled=False)
        eager = weight_grads(model, x, fused=False, compiled=False)
        fused_c = weight_grads(model, x, fused=True, compiled=True)
        plain_c = weight_grads(model, x, fused=False, compiled=True)
        # What is ours: the fused losses under compile, against the plain formula under compile
        # (Inductor's network backward rounds differently from eager's, the same for both).
        err_f = max(normwise_error(a, t, "fused") for a, t in zip(fused_c, truth))
        err_p = max(normwise_error(a, t, "plain") for a, t in zip(plain_c, truth))
        err_e = max(normwise_error(a, t, "eager") for a, t in zip(eager, truth))
        k = max(f.numel() // f.shape[0] for f in model.features(x))
        limit = 2 * max(err_p, err_e) + bound(torch.float32, k)
        if not err_f <= limit:
            raise AssertionError(f"weight gradients with the fused losses under compile are {err_f:.3g} from float64, "
                                 f"more than 2 x the plain formula's ({err_p:.3g} compiled, {err_e:.3g} eager) + bound")
        row["detail"] = (f"fused compiled {err_f:.1e}, plain compiled {err_p:.1e}, eager {err_e:.1e} from float64 "
                         f"({len(truth)} weight tensors)")


def _check_graphs(chk, device, smoke: bool):
    from benchmarks.bench_scoring import build_model
    from ckaad_fast.scoring import Scorer

    backbone, layers, size, batch = _tiny_or_real(smoke)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5)).to(device)
    # On the CPU smoke run, padding alone (Inductor's C++ would take minutes on 2 cores).
    kw = {"compile": True, "cuda_graphs": True} if device.type == "cuda" else {"pad_batches": True}
    dtype = "float32" if smoke else "bfloat16"
    with chk.item("graphs", f"Scorer {dtype} + compile{' + CUDA graphs' if device.type == 'cuda' else ''} equals eager; "
                            "a short batch is padded through the same graph") as row:
        torch._dynamo.reset()
        eager = Scorer(build_model(backbone, layers, size), device=device, dtype=dtype, batch_size=batch)
        graphed = Scorer(build_model(backbone, layers, size), device=device, dtype=dtype, batch_size=batch, **kw)
        truth = build_model(backbone, layers, size).to(device)
        t = _float64(truth, x)
        s_e, m_e = eager(x)
        s_g, m_g = graphed(x)
        lim_dtype = torch.float32 if smoke else torch.bfloat16
        detail = no_worse_than_eager((s_g, m_g), (s_e, m_e), t, _widest(truth), "scores, maps")
        n_graphs = len(graphed._graphs)
        s_short, _ = graphed(x[: batch - 1])
        if len(graphed._graphs) != n_graphs:
            raise AssertionError(f"the short batch captured a graph of its own ({len(graphed._graphs)} graphs)")
        # The same graph and the same images in the other rows: per-image arithmetic, the same
        # kernels, so the rows agree to the last rounding of the dtype.
        moved = normwise_error(s_short, s_g[: batch - 1], "padded batch")
        if not moved <= bound(lim_dtype, 1):
            raise AssertionError(f"the padded batch's scores moved by {moved:.2e} of their norm")
        row["detail"] = f"{detail}; {max(1, n_graphs)} graph(s), padded batch moved {moved:.1e}"

    if device.type != "cuda":
        return
    with chk.item("graphs", "torch.compile(mode='reduce-overhead'): zero cudagraph skips") as row:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        model = build_model(backbone, layers, size).to(device)
        fn = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        with torch.inference_mode():
            for _ in range(3):
                s, m = fn(x)
            s, m = s.clone(), m.clone()
            s_eager, m_eager = model(x)
        t = _float64(model, x)
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
        if skips:
            raise AssertionError(f"{skips} cudagraph skip(s): {dict(counters['inductor'])}")
        row["detail"] = "0 skips; " + no_worse_than_eager((s, m), (s_eager, m_eager), t, _widest(model), "scores, maps")


def check_decisions(chk, device, smoke: bool):
    from benchmarks.bench_scoring import build_model
    from ckaad_fast.calibration import calibrate
    from ckaad_fast.export import ScoringGraph
    from ckaad_fast.scoring import Scorer

    backbone, layers, size, batch = _tiny_or_real(smoke)
    n = max(2 * batch + 3, 23)  # full batches and a short one; at least 20 for a 10% rate
    g = torch.Generator().manual_seed(11)
    images = torch.randn(n, 3, size, size, generator=g)
    data = [(images[i], 0, f"image{i}") for i in range(n)]  # (image, label, path) items
    for precision in ("float32", "bfloat16"):
        with chk.item("decisions", f"calibrate at 10% FPR in {precision}, then the Scorer's default flags what it "
                                   "promised") as row:
            cal = calibrate(build_model(backbone, layers, size), data, target_fpr=0.1, batch_size=batch, device=device,
                            precision=precision)
            scorer = Scorer(build_model(backbone, layers, size), device=device, calibration=cal, batch_size=batch)
            if scorer.precision != precision:
                raise AssertionError(f"the Scorer chose {scorer.precision}, the calibration was {precision}")
            scores = torch.cat([scorer(images[i:i + batch])[0].cpu() for i in range(0, n, batch)])
            flagged = int((scores >= torch.tensor(cal.decision_threshold(), dtype=torch.float32)).sum())
            promised = int(0.1 * n + 1e-9)
            if flagged != promised:
                raise AssertionError(f"flagged {flagged} of {n}, the calibration promised {promised}")
            row["detail"] = f"{flagged} of {n} flagged, as promised"

    with chk.item("decisions", "the exported graph, whole (uint8 pixels in), and its torch.export program against "
                               "the Scorer, float32, TF32 off") as row, no_tf32():
        model = build_model(backbone, layers, size)
        pixels = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(device)
        graph = ScoringGraph(build_model(backbone, layers, size)).to(device).eval()
        scorer = Scorer(model, device=device, dtype="float32", batch_size=batch)
        x = scorer.normalise(pixels)
        with torch.inference_mode():
            s_sc, m_sc = scorer(x)
            score, _, _, amap = graph(pixels)
        truth = _float64(model, x)
        program = torch.export.export(graph, graph.example_inputs(batch, device)[:1])
        with torch.inference_mode():
            p_score, _, _, p_map = program.module()(pixels)
        k = _widest(model)
        # The Scorer is the eager float32 path here: the graph may be off by twice its error.
        detail = no_worse_than_eager((score, amap), (s_sc, m_sc), truth, k, "graph")
        detail += "; " + no_worse_than_eager((p_score, p_map), (s_sc, m_sc), truth, k, "exported program")
        row["detail"] = detail


HEAD_RANGES = ("ckaad_fast/error map", "ckaad_fast/upsample+blur", "ckaad_fast/top-k")


def _device_time(evt) -> float:
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def profile_scorer(chk, device, smoke: bool, out_dir):
    """One Scorer batch (eager, so that every range is visible) under torch.profiler: the trace is
    saved, and the head's ranges' share of the forward's GPU time is the criterion."""
    from benchmarks.bench_scoring import build_model
    from ckaad_fast.scoring import Scorer

    backbone, layers, size, batch = (("resnet18", (1, 2), 64, 2) if smoke else ("wide_resnet50_2", (1, 2, 3), 256, 128))
    dtype = "float32" if smoke else "bfloat16"
    with chk.item("profile", f"one Scorer batch, {backbone}/{size} batch {batch} {dtype}: the head's share of GPU "
                             "time") as row:
        scorer = Scorer(build_model(backbone, layers, size), device=device, dtype=dtype, batch_size=batch)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
        scorer(x)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            scorer(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        timing = _device_time if device.type == "cuda" else (lambda e: float(e.cpu_time_total))
        by_name = {e.key: timing(e) for e in prof.key_averages()}
        total = by_name.get("ckaad_fast/forward", 0.0)
        head = sum(by_name.get(k, 0.0) for k in HEAD_RANGES)
        if total <= 0 or head <= 0:
            raise AssertionError(f"the trace lacks the library's ranges (forward {total}, head {head}): "
                                 f"{sorted(k for k in by_name if k.startswith('ckaad_fast/'))}")
        share = head / total
        if out_dir:
            trace = os.path.join(os.fspath(out_dir), "scorer_trace.json")
            prof.export_chrome_trace(trace)
            with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(trace)
        parts = ", ".join(f"{k.split('/')[1]} {by_name.get(k, 0.0) / 1e3:.2f} ms" for k in HEAD_RANGES)
        row["detail"] = f"head {100 * share:.1f}% of the forward's {total / 1e3:.2f} ms ({parts})"
        row["verdict"] = chk.goal(share, 0.10, at_least=False)
        chk.csv({"bench": "profile", "name": f"{backbone}/{size}", "batch": batch, "dtype": dtype,
                 "forward_ms": f"{total / 1e3:.3f}", "head_share": f"{share:.4f}"})
