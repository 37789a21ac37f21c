"""How much do the fused loss ops save in a whole CKAAD training step?

One step = frozen backbone + auto-encoder forward, the discriminator step (Eq. 11, clipped Adam)
and the generator step (Eq. 2 + lambda * Eq. 12). The same :class:`ckaad_fast.training.Trainer`
runs it with the fused ops (``FusedLosses``), with the same losses written in eager PyTorch from
their formulas (what the authors' code computes), and with ``torch.compile`` of those, on the same
model and the same inputs.
A second row times the losses alone (forward and backward on fixed features), which is the part
that differs.

Each row also shows how close the fused variant comes to the machine's ceiling: the step's FLOPs
(counted by torch) against a large matmul's FLOP/s, and the losses against the time it takes to
read their inputs once and write their gradients once (they do almost no arithmetic).

    python -m benchmarks.bench_train_step            # resnet18 / 128 px on CPU (+ wide_resnet50_2 / 256 bf16 on CUDA)
    python -m benchmarks.bench_train_step --quick [--no-compile]

Rows are appended to benchmarks/results/train_step.csv.
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F

from benchmarks.common import (append_results, best_of_rounds, check_agreement, count_flops, matmul_ceiling,
                               max_abs_diff, median_time, memory_floor, print_table)

from ckaad_fast.training import CKAAD
from ckaad_fast.training import FusedLosses, TrainConfig, Trainer


class EagerLosses:
    """The step's losses in plain PyTorch, straight from the formulas (the authors' code)."""

    def reconstruction(self, inputs, outputs):
        # Eq. 2: per layer, batch mean of 1 - cos of the flattened maps.
        total = 0
        for x, y in zip(inputs, outputs):
            total = total + torch.mean(1 - F.cosine_similarity(y.reshape(y.shape[0], -1), x.reshape(x.shape[0], -1)))
        return total

    def discriminator(self, s_normal, s_anomalous, s_generated, gamma, margin):
        # Eq. 11 summed over layers; energy = |score|.
        total = 0
        for n, a, g in zip(s_normal, s_anomalous, s_generated):
            total = (total + n.abs().mean() + (1 - gamma) * F.relu(margin - a.abs()).mean()
                     + gamma * F.relu(margin - g.abs()).mean())
        return total

    def generator(self, s_generated):
        # Eq. 12's term with a gradient: the mean energy of the reconstructions.
        total = 0
        for g in s_generated:
            total = total + g.abs().mean()
        return total


class CompiledEagerLosses:
    """:class:`EagerLosses` under ``torch.compile``: what a user who compiles their own loss code
    gets. Built once per run, so that its compilations are reused across rounds."""

    def __init__(self):
        eager = EagerLosses()
        self.reconstruction = torch.compile(eager.reconstruction)
        self.discriminator = torch.compile(eager.discriminator)
        self.generator = torch.compile(eager.generator)


CASES = {
    # name: (backbone, layers, image size, batch, amp, device)
    "cpu": ("resnet18", (2, 3), 128, 8, None, "cpu"),
    "cuda": ("wide_resnet50_2", (1, 2, 3), 256, 16, "bf16", "cuda"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (for CI)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default: 7)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant, best kept (default: 2)")
    p.add_argument("--strategy", default="cka_patch", help="strategy whose step is timed (default: cka_patch)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile-of-eager-losses variant")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/train_step.csv")
    return p.parse_args(argv)


def _inputs(batch, size, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    return x.to(device), torch.randn(batch, 3, size, size, generator=g).to(device)


def _time_steps(model, cfg, losses, inputs, repeats, device):
    """Median time of Trainer.step with ``losses`` on a private copy of the model (same start)."""
    trainer = Trainer(copy.deepcopy(model), cfg, losses=losses)
    return median_time(lambda i: trainer.step(*inputs[i]), device=device, warmup=2, repeats=repeats,
                       rotate=len(inputs))


def _loss_inputs(model, cfg, inputs, device):
    """Fixed features, reconstructions and discriminator scores, as one step would see them."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        feats = model.features(torch.cat(inputs[0]))
        recon = model.autoencoder(feats)
    n = inputs[0][0].shape[0]
    feats = [f[:n] for f in feats]
    recon = [r[:n].detach().requires_grad_(True) for r in recon]
    # D's scores of the normal and anomalous features and of both images' reconstructions, stacked.
    scores = [torch.randn(4 * n, 1, *f.shape[-2:], device=device, dtype=f.dtype).requires_grad_(True) for f in feats]
    return n, feats, recon, scores


def _time_losses(model, cfg, losses, inputs, repeats, device):
    """Median time of the step's losses alone, forward + backward, on fixed features."""
    n, feats, recon, scores = _loss_inputs(model, cfg, inputs, device)

    def run(_):
        s_n = [s[:n] for s in scores]
        s_a = [s[n:2 * n] for s in scores]
        s_g = [s[2 * n:] for s in scores]
        d = losses.discriminator(s_n, s_a, s_g, cfg.gamma, cfg.margin)
        g = losses.reconstruction(feats, recon) + cfg.lam * losses.generator(s_g)
        torch.autograd.backward([d, g])

    return median_time(run, device=device, warmup=2, repeats=repeats)


def _losses_floor(model, cfg, inputs, repeats, device):
    """Seconds to read every input of the losses once and write every gradient once: the least
    any implementation must move."""
    _, feats, recon, scores = _loss_inputs(model, cfg, inputs, device)
    reads = [t.detach() for t in feats + recon + scores]
    writes = [torch.empty_like(t) for t in recon + scores]
    return memory_floor([(reads, writes)], device=device, repeats=repeats)


def _step_flops(model, cfg, inputs):
    """FLOPs of one training step (forward, both backward passes), counted by torch."""
    trainer = Trainer(copy.deepcopy(model), cfg, losses=FusedLosses())
    return count_flops(trainer.step, *inputs[0])


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*random weights")
    cases = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for case in cases:
        backbone, layers, size, batch, amp, dev = CASES[case]
        repeats = args.repeats
        if args.quick:
            size, batch, repeats = size // 2, max(2, batch // 4), 3
        device = torch.device(dev)
        cfg = TrainConfig(strategy=args.strategy, backbone=backbone, layers=layers, weights="none", image_size=size,
                          batch_size=batch, amp=amp, device=dev)
        torch.manual_seed(0)
        model = CKAAD(cfg.model_config(), weights="none").to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        inputs = [_inputs(batch, size, device, seed) for seed in range(2)]
        ceilings = {
            # The step is compute-bound: its FLOPs against a large matmul in the step's precision.
            "train step": _step_flops(model, cfg, inputs)
            / matmul_ceiling(device, torch.bfloat16 if amp == "bf16" else torch.float32, quick=args.quick),
            # The losses are memory-bound: reading their inputs and writing their gradients.
            "losses fwd+bwd": _losses_floor(model, cfg, inputs, repeats, device),
        }
        # One step from the same start with the fused and the eager losses: the same losses.
        steps = [Trainer(copy.deepcopy(model), cfg, losses=v).step(*inputs[0]) for v in (FusedLosses(), EagerLosses())]
        check_agreement(f"{case} step losses, fused vs eager", max_abs_diff(*steps), 1e-4 if amp is None else 5e-2)
        variants = {"eager": EagerLosses(), "fused": FusedLosses()}
        if not args.no_compile:
            torch._dynamo.reset()
            variants["compiled"] = CompiledEagerLosses()
        for what, timer in (("train step", _time_steps), ("losses fwd+bwd", _time_losses)):
            # Alternating rounds, each variant's best median kept: none pays for warm-up (or
            # compilation) or for another process's burst on a shared machine.
            t = best_of_rounds({name: (lambda losses=losses: timer(model, cfg, losses, inputs, repeats, device))
                                for name, losses in variants.items()}, args.rounds)
            t_fused = t["fused"]
            rows.append({
                "what": what, "strategy": args.strategy, "device": dev, "backbone": backbone,
                "layers": " ".join(map(str, layers)), "image_size": size, "batch": batch, "amp": amp or "fp32",
                "eager_ms": 1e3 * t["eager"], "compiled_ms": 1e3 * t.get("compiled", float("nan")),
                "fused_ms": 1e3 * t_fused, "speedup": t["eager"] / t_fused,
                "speedup_vs_compiled": t.get("compiled", float("nan")) / t_fused,
                "ceiling": "matmul FLOP/s" if what == "train step" else "read inputs + write grads",
                "ceiling_ms": 1e3 * ceilings[what], "pct_of_ceiling": 100 * ceilings[what] / t_fused,
                "quick": args.quick,
            })
    print_table(
        f"One CKAAD training step ({args.strategy}: D step + G step), losses in eager PyTorch, torch.compile "
        "of them, and the fused ops",
        ["what", "device", "backbone", "size", "batch", "precision", "eager ms", "compiled ms", "fused ms",
         "eager / fused", "compiled / fused", "ceiling", "ceiling ms", "fused % of ceiling"],
        [[r["what"], r["device"], f"{r['backbone']} {r['layers']}", r["image_size"], r["batch"], r["amp"],
          r["eager_ms"], r["compiled_ms"], r["fused_ms"], r["speedup"], r["speedup_vs_compiled"], r["ceiling"],
          r["ceiling_ms"], r["pct_of_ceiling"]] for r in rows],
    )
    if not args.no_save:
        for case in cases:  # each device's rows stamped with that machine's name
            path = append_results("train_step", [r for r in rows if r["device"] == CASES[case][5]], device=CASES[case][5])
        print(f"appended to {path}")
    return rows


if __name__ == "__main__":
    main()
