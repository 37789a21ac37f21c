"""Training CKAAD and the ablation strategies of the paper's Table 3.

One training step (:meth:`Trainer.step`), as in the authors' loop:

1. The frozen backbone (always in eval mode, no graph) gives the features F of the normal batch
   and of the anomalous batch; the auto-encoder G reconstructs both, F~ = G(F), in one pass (its
   InstanceNorm works per image, so batching them together changes nothing).
2. Discriminator step (adversarial strategies only): the loss below on detached inputs, Adam,
   gradients clipped to ``clip_norm``.
3. Generator step, with the just-updated D on the same (not recomputed) reconstructions:
   ``cosine_reconstruction_loss(F_normal, F~_normal) + lam * adversarial loss``.

Strategies (``TrainConfig.strategy``):

``cka_patch`` (default; Eq. 11-13)
    Patch energy discriminator, energy = |D(p)|. D loss ``ops.discriminator_loss(D(F+), D(F-),
    D(F~), gamma, margin)`` (summed over layers), G adversarial loss ``ops.generator_loss(D(F~))``.
``cka_img`` (Eq. 8-9)
    The same losses with the image-level energy discriminator (one (B, 1) score per image).
``gan`` (Eq. 7)
    A vanilla GAN whose discriminator never sees the anomalies: the patch discriminator's raw
    output is a logit, D loss = BCE-with-logits(D(F+), 1) + BCE-with-logits(D(F~), 0), and the
    generator uses the non-saturating loss BCE-with-logits(D(F~), 1). The anomalies still enter
    as inputs of G, so F~ holds reconstructions of normal and anomalous images. These BCE terms
    are plain PyTorch (there is no fused op for them).
``recon_sub`` (Eq. 4)
    ``L_rec(F+) - lam * L_rec(F-)``: no discriminator.
``recon`` (Eq. 2)
    ``L_rec(F+)`` only; anomalies are not used at all.

alpha (Eq. 5-6): the input distribution of G is the mixture alpha P+ + (1 - alpha) P-, so the
distribution of generated features is P_g = alpha P_g+ + (1 - alpha) P_g-. Every expectation over
P_g (the hinge on generated features in the D loss, the G adversarial loss, and the gan BCE terms)
is therefore the alpha-weighted mixture of the term on reconstructions of normal inputs and the
term on reconstructions of anomalous inputs. When the two batches are in the proportion
alpha : 1 - alpha (equal batches and alpha = 0.5, the industrial protocol) this is exactly the
mean over the concatenated reconstructions, which is what runs, in one op call; otherwise (e.g. a
coarse anomaly set smaller than the batch) the two terms are computed separately and weighted.
alpha is not the elastic distortion's strength (``elastic_alpha``, 200).

Data: the industrial protocol (no real anomalies) pairs every normal batch with its own
elastic distortion (:class:`ckaad_fast.data.PseudoAnomalyDataset`, redrawn each epoch); with a
coarse anomaly set (the medical protocol) a separate loader of batch ``min(batch_size, n)``
cycles, reshuffled at every pass. The normal loader drops its last incomplete batch.

Several processes (``torchrun``; see :mod:`ckaad_fast.distributed`): :func:`train` called on every
rank of a process group (it joins the one torchrun describes when none is running yet) trains one
model with DistributedDataParallel. ``batch_size`` stays the *global* batch: each of the N
processes takes ``batch_size / N`` images of every global batch (``batch_size`` must be a multiple
of N), and the anomaly batch is ``min(batch_size, n_anomalies)`` rounded down to a multiple of N.
The loaders (a :class:`~ckaad_fast.distributed.GlobalBatchSampler` each, the normal one and the
anomalous one cycling independently) deal the global batches a single process would draw, and
DDP averages the gradients of the per-rank mean losses, which is the gradient of the global mean.
So the same configuration gives the same training on 1 or N processes (up to float rounding), the
learning rates need no change, and a checkpoint resumes on any number of processes. The
auto-encoder and the discriminator have a DDP wrapper each: the discriminator step goes through
D's wrapper; the generator step calls the bare D (frozen), so no gradient of D is synchronised
there. Logged losses are averaged over the ranks (equal to the single-process ones); evaluation is
sharded and gathered (:func:`ckaad_fast.evaluation.evaluate_model` with ``distributed=True``);
rank 0 alone reads the checkpoint (and broadcasts it) and writes the checkpoint and the log.

Reproducibility: the seed fixes the model's initialisation, every loader's order (a generator
seeded from (seed, epoch)), the pseudo-anomalies and the global RNGs. ``out_dir/checkpoint.pt``
(written atomically after every epoch) holds the weights, both configurations, the optimiser and
grad-scaler states, the epoch, the RNG states and the history, all loadable with
``torch.load(weights_only=True)``; resuming from it gives bit-identical weights to an
uninterrupted run on the CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import ops
from .data import PseudoAnomalyDataset
from .model import (
    PlainConfig,
    CKAAD,
    STRATEGIES,
    ModelConfig,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .models import BACKBONES
from .profiling import nvtx_range

__all__ = [
    "ADVERSARIAL_STRATEGIES",
    "STRATEGIES",
    "STRATEGIES_USING_ANOMALIES",
    "FusedLosses",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "train",
]

#: Strategies that train a discriminator.
ADVERSARIAL_STRATEGIES = ("cka_patch", "cka_img", "gan")
#: Strategies whose step takes an anomalous batch.
STRATEGIES_USING_ANOMALIES = ("cka_patch", "cka_img", "gan", "recon_sub")
AMP_MODES = (None, "bf16", "fp16")
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"

# Fields that define the run: a resumed run must have the same values as the checkpoint.
_RUN_FIELDS = (
    "strategy", "backbone", "layers", "image_size", "batch_size", "ae_lr", "d_lr", "lam", "gamma",
    "alpha", "margin", "clip_norm", "betas", "seed", "topk", "sigma", "elastic_alpha", "elastic_sigma",
)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
def _bad(name: str, must: str, value) -> ValueError:
    return ValueError(f"TrainConfig.{name} must {must}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig(PlainConfig):
    """Everything that defines a training run (the model's shape included).

    Defaults are the paper's industrial setting (wide_resnet50_2, layers 1-3, AE lr 5e-3); for the
    medical data sets use ``backbone="resnet18", layers=(2, 3), ae_lr=1e-3``.

    Attributes:
        strategy: ``cka_patch`` (the paper's method), ``cka_img``, ``gan``, ``recon_sub`` or ``recon``.
        backbone: a name of :data:`ckaad_fast.models.BACKBONES`.
        layers: backbone layers (1..4) to reconstruct, increasing.
        weights: backbone weights: ``"imagenet"``, ``"none"`` (random, for tests) or a state_dict path.
        image_size: input size (int or (h, w)); the data sets must produce images of this size.
        epochs: total number of epochs (a resumed run continues up to this number).
        batch_size: normal images per step (the anomaly batch has min(batch_size, n_anomalies)).
            Under torchrun this is the global batch over all processes: each of the N processes
            takes batch_size / N of it (batch_size must be a multiple of N), so the effective batch
            and the training are those of one process with the same batch_size. To use more GPUs
            at the same per-GPU load, raise batch_size with them; then raise the learning rates
            too, by about sqrt(k) for a k times larger batch (Adam), and check the losses.
        ae_lr, d_lr: Adam learning rates of the auto-encoder and the discriminator.
        lam: lambda, the weight of the adversarial loss (of the anomalies' reconstruction loss for
            ``recon_sub``).
        gamma: weight of the generated term against the anomalous term in the D loss (Eq. 8/11).
        alpha: the mixture weight of normal inputs in G's input distribution (Eq. 5-6): weight of
            the reconstructions of normal inputs in every expectation over generated features.
        margin: the hinge's margin a (energy discriminators).
        clip_norm: max gradient norm of the discriminator step (None: no clipping).
        betas: Adam betas of both optimisers.
        seed: seeds the initialisation, the data order, the pseudo-anomalies and the RNGs.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: None (float32), ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA only, with GradScaler).
        compile: wrap the auto-encoder and the discriminator in ``torch.compile``: True (inductor)
            or a backend name (e.g. ``"aot_eager"``); False: eager.
        num_workers: DataLoader worker processes.
        eval_every: evaluate on ``eval_set`` every this many epochs (and after the last); 0: never.
        topk: image score = mean of the top-k map values (None: mean of the map, the ISIC protocol).
        sigma: the anomaly map's Gaussian blur.
        elastic_alpha, elastic_sigma: the elastic distortion of the pseudo-anomalies.
    """

    _kind = "training configuration"

    strategy: str = "cka_patch"
    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    weights: str | None = "imagenet"
    image_size: int | tuple[int, int] = 256
    epochs: int = 200
    batch_size: int = 16
    ae_lr: float = 5e-3
    d_lr: float = 1e-4
    lam: float = 0.02
    gamma: float = 0.5
    alpha: float = 0.5
    margin: float = 5.0
    clip_norm: float | None = 1.0
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    device: str = "cpu"
    amp: str | None = None
    compile: bool | str = False
    num_workers: int = 0
    eval_every: int = 1
    topk: int | None = 100
    sigma: float = 4.0
    elastic_alpha: float = 200.0
    elastic_sigma: float = 5.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise _bad("strategy", f"be one of {STRATEGIES}", self.strategy)
        if self.backbone not in BACKBONES:
            raise _bad("backbone", f"be one of {tuple(BACKBONES)}", self.backbone)
        try:
            layers = tuple(int(v) for v in self.layers)
        except (TypeError, ValueError):
            raise _bad("layers", "be a sequence of ints in 1..4", self.layers) from None
        if not layers or any(not 1 <= v <= 4 for v in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise _bad("layers", "be a non-empty, strictly increasing sequence of ints in 1..4", self.layers)
        self.layers = layers
        if self.weights is not None:
            if isinstance(self.weights, os.PathLike):
                self.weights = os.fspath(self.weights)
            if not isinstance(self.weights, str):
                raise _bad("weights", "be 'imagenet', 'none' or a path", self.weights)
        size = (self.image_size, self.image_size) if _is_int(self.image_size) else tuple(self.image_size)
        if len(size) != 2 or not all(_is_int(v) and v >= 16 for v in size):
            raise _bad("image_size", "be an int or an (h, w) pair of ints >= 16", self.image_size)
        self.image_size = (int(size[0]), int(size[1]))
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise _bad(name, "be an int >= 1", v)
        for name in ("ae_lr", "d_lr", "margin", "sigma", "elastic_sigma"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise _bad(name, "be a finite number > 0", v)
        for name in ("lam", "elastic_alpha"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise _bad(name, "be a finite number >= 0", v)
        for name in ("gamma", "alpha"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v <= 1.0:
                raise _bad(name, "lie in [0, 1]", v)
        if self.clip_norm is not None and (not _is_number(self.clip_norm) or self.clip_norm <= 0):
            raise _bad("clip_norm", "be a finite number > 0 or None", self.clip_norm)
        try:
            betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise _bad("betas", "be two numbers in [0, 1)", self.betas) from None
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise _bad("betas", "be two numbers in [0, 1)", self.betas)
        self.betas = betas
        if not _is_int(self.seed):
            raise _bad("seed", "be an int", self.seed)
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise _bad("device", "name a torch device ('cpu', 'cuda', 'cuda:1')", self.device) from None
        if dev.type not in ("cpu", "cuda"):
            raise _bad("device", "be a CPU or CUDA device", self.device)
        self.device = str(self.device)
        if isinstance(self.amp, str) and self.amp.lower() in ("none", ""):
            self.amp = None
        if self.amp not in AMP_MODES:
            raise _bad("amp", "be None, 'bf16' or 'fp16'", self.amp)
        if self.amp == "fp16" and dev.type != "cuda":
            raise _bad("amp", "not be 'fp16' on the CPU (use 'bf16')", self.amp)
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise _bad("compile", "be a bool or a torch.compile backend name", self.compile)
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise _bad("num_workers", "be an int >= 0", self.num_workers)
        if not _is_int(self.eval_every) or self.eval_every < 0:
            raise _bad("eval_every", "be an int >= 0", self.eval_every)
        if self.topk is not None and (not _is_int(self.topk) or self.topk < 1):
            raise _bad("topk", "be an int >= 1 or None", self.topk)
        h, w = self.image_size
        if self.topk is not None and self.topk > h * w:
            raise _bad("topk", f"be at most the map's {h * w} pixels", self.topk)

    # -- conversions (to_dict / from_dict come from PlainConfig) ---------------------------------
    def model_config(self) -> ModelConfig:
        """The :class:`ckaad_fast.model.ModelConfig` of the detector this run trains."""
        return ModelConfig(
            backbone=self.backbone, layers=self.layers, image_size=self.image_size,
            strategy=self.strategy, sigma=self.sigma, topk=self.topk,
        )

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the backbone's weights expect: build the data sets with these."""
        from .models.backbone import _SPECS

        spec = _SPECS[self.backbone]
        return tuple(spec.mean), tuple(spec.std)

    @property
    def uses_anomalies(self) -> bool:
        return self.strategy in STRATEGIES_USING_ANOMALIES


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
class FusedLosses:
    """The loss functions of a step: the fused ops of :mod:`ckaad_fast.ops`, looked up at call
    time. Pass another object with the same four methods to :class:`Trainer` to compare."""

    def reconstruction(self, inputs, outputs):
        return ops.cosine_reconstruction_loss(inputs, outputs)

    def discriminator(self, s_normal, s_anomalous, s_generated, gamma, margin):
        return ops.discriminator_loss(s_normal, s_anomalous, s_generated, gamma, margin)

    def generator(self, s_generated):
        return ops.generator_loss(s_generated)


def _bce_sum(scores: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """Sum over layers of the mean BCE-with-logits of every score against ``target`` (gan)."""
    total = None
    for s in scores:
        s = s.float()
        term = F.binary_cross_entropy_with_logits(s, torch.full_like(s, target))
        total = term if total is None else total + term
    return total


def _mixture(term: Callable[[list], torch.Tensor], scores: Sequence[torch.Tensor], n_normal: int,
             alpha: float) -> torch.Tensor:
    """alpha * term(generated from normal) + (1 - alpha) * term(generated from anomalous), where
    ``scores`` hold the normal ones first. One call when the batch proportion already is alpha."""
    total = scores[0].shape[0]
    if n_normal == total or abs(n_normal / total - alpha) <= 1e-9:
        return term(list(scores))
    return alpha * term([s[:n_normal] for s in scores]) + (1 - alpha) * term([s[n_normal:] for s in scores])


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Optimisers, grad scalers and the training step of one run on ``model``.

    ``step(normal, anomalous)`` runs one D step (adversarial strategies) and one G step on a batch
    of normalised images and returns the detached losses ``(d_loss, g_loss, recon_loss)`` as one
    float32 tensor on the device, without synchronising (``d_loss`` is 0 without a discriminator).

    ``distributed=True`` (in a process group, e.g. under torchrun) wraps the auto-encoder and the
    discriminator in a DistributedDataParallel each, so that their gradients are averaged over the
    ranks. The discriminator step runs through D's wrapper; the generator step calls the bare,
    frozen D (its parameters get no gradient there, so DDP has nothing to synchronise). The
    returned losses are this rank's; average them over the ranks for the global ones.
    """

    def __init__(self, model: CKAAD, config: TrainConfig, losses: Any = None, *, distributed: bool = False):
        self.model = model
        self.config = config
        self.losses = FusedLosses() if losses is None else losses
        self.device = torch.device(config.device)
        self.strategy = config.strategy
        self.discriminator = model.discriminator if config.strategy in ADVERSARIAL_STRATEGIES else None
        betas = tuple(config.betas)
        self.opt_ae = torch.optim.Adam(model.autoencoder.parameters(), lr=config.ae_lr, betas=betas)
        self.opt_d = (
            torch.optim.Adam(self.discriminator.parameters(), lr=config.d_lr, betas=betas)
            if self.discriminator is not None else None
        )
        fp16 = config.amp == "fp16"
        self.scaler_ae = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        self.channels_last = self.device.type == "cuda"
        self.distributed = bool(distributed)
        self._ae = model.autoencoder
        self._d = self.discriminator
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ae = DDP(model.autoencoder, device_ids=ids)
            if self.discriminator is not None:
                self._d = DDP(self.discriminator, device_ids=ids)
        # The generator step's D: frozen, so never the DDP wrapper.
        self._d_frozen = self.discriminator
        if config.compile:
            backend = "inductor" if config.compile is True else config.compile
            self._ae = torch.compile(self._ae, backend=backend)
            if self.discriminator is not None:
                self._d = torch.compile(self._d, backend=backend)
                self._d_frozen = torch.compile(self.discriminator, backend=backend) if self.distributed else self._d
        elif not self.distributed:
            self._d_frozen = self._d

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _update(self, loss, optimizer, scaler, params=None):
        scaler.scale(loss).backward()
        if params is not None and self.config.clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm)
        scaler.step(optimizer)
        scaler.update()

    def step(self, normal: torch.Tensor, anomalous: torch.Tensor | None = None) -> torch.Tensor:
        cfg, losses = self.config, self.losses
        uses_anomalies = cfg.uses_anomalies
        if uses_anomalies and (anomalous is None or anomalous.shape[0] == 0):
            raise ValueError(f"strategy {cfg.strategy!r} needs a batch of anomalous images")
        normal = normal.to(self.device, non_blocking=True)
        if self.channels_last:
            normal = normal.contiguous(memory_format=torch.channels_last)
        n = normal.shape[0]
        images = normal
        if uses_anomalies:
            anomalous = anomalous.to(self.device, non_blocking=True)
            if self.channels_last:
                anomalous = anomalous.contiguous(memory_format=torch.channels_last)
            images = torch.cat([normal, anomalous])

        with self._autocast():
            with torch.no_grad():
                feats = self.model.features(images)
            with nvtx_range("auto-encoder"):
                recon = self._ae(feats)
            recon = [r if r.dtype == f.dtype else r.to(f.dtype) for r, f in zip(recon, feats)]
        feats_n = [f[:n] for f in feats]
        recon_n = [r[:n] for r in recon]

        d_loss = None
        D = self._d
        if D is not None:
            with nvtx_range("discriminator step"):
                self.discriminator.requires_grad_(True)
                self.opt_d.zero_grad(set_to_none=True)
                with self._autocast():
                    detached = [r.detach() for r in recon]
                    if self.strategy == "gan":
                        # The vanilla GAN's discriminator sees normal features and reconstructions only.
                        scores = D([torch.cat([f[:n], r]) for f, r in zip(feats, detached)])
                        s_real = [s[:n] for s in scores]
                        s_gen = [s[n:] for s in scores]
                        d_loss = _bce_sum(s_real, 1.0) + _mixture(lambda s: _bce_sum(s, 0.0), s_gen, n, cfg.alpha)
                    else:
                        scores = D([torch.cat([f, r]) for f, r in zip(feats, detached)])
                        total = images.shape[0]
                        s_n = [s[:n] for s in scores]
                        s_a = [s[n:total] for s in scores]
                        s_gen = [s[total:] for s in scores]
                        d_loss = _mixture(
                            lambda g: losses.discriminator(s_n, s_a, g, cfg.gamma, cfg.margin), s_gen, n, cfg.alpha
                        )
                self._update(d_loss, self.opt_d, self.scaler_d, self.discriminator.parameters())

        with nvtx_range("generator step"):
            if self.discriminator is not None:
                # D is not trained here: its weights need no gradient (G's still flow through it).
                self.discriminator.requires_grad_(False)
            self.opt_ae.zero_grad(set_to_none=True)
            with self._autocast():
                rec = losses.reconstruction(feats_n, recon_n)
                if self.strategy in ("cka_patch", "cka_img"):
                    adv = _mixture(losses.generator, self._d_frozen(recon), n, cfg.alpha)
                    g_loss = rec + cfg.lam * adv
                elif self.strategy == "gan":
                    adv = _mixture(lambda s: _bce_sum(s, 1.0), self._d_frozen(recon), n, cfg.alpha)
                    g_loss = rec + cfg.lam * adv
                elif self.strategy == "recon_sub":
                    rec_anom = losses.reconstruction([f[n:] for f in feats], [r[n:] for r in recon])
                    g_loss = rec - cfg.lam * rec_anom
                else:
                    g_loss = rec
            self._update(g_loss, self.opt_ae, self.scaler_ae)
            if self.discriminator is not None:
                self.discriminator.requires_grad_(True)

        zero = g_loss.new_zeros(())
        return torch.stack([(zero if d_loss is None else d_loss).detach().float(), g_loss.detach().float(),
                            rec.detach().float()])

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "optimizers": {"ae": self.opt_ae.state_dict(), "d": None if self.opt_d is None else self.opt_d.state_dict()},
            "scalers": {"ae": self.scaler_ae.state_dict(), "d": self.scaler_d.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt_ae.load_state_dict(state["optimizers"]["ae"])
        if self.opt_d is not None:
            if state["optimizers"].get("d") is None:
                raise ValueError("the checkpoint has no discriminator optimiser state")
            self.opt_d.load_state_dict(state["optimizers"]["d"])
        if state["scalers"]["ae"]:
            self.scaler_ae.load_state_dict(state["scalers"]["ae"])
        if state["scalers"]["d"]:
            self.scaler_d.load_state_dict(state["scalers"]["d"])


# ------------------------------------------------------------------------------------------------
# Data plumbing
# ------------------------------------------------------------------------------------------------
class _Images(Dataset):
    """Only the image (item[0]) of any of the library's data sets: cheaper to collate."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0]


class _WithDistortion(Dataset):
    """(normal image, its elastic distortion): the industrial protocol's paired batches."""

    def __init__(self, pseudo: PseudoAnomalyDataset):
        self.pseudo = pseudo

    def __len__(self):
        return len(self.pseudo)

    def __getitem__(self, i):
        image = self.pseudo.normal_dataset[i][0]
        return image, self.pseudo.distort(image, i)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _seed_worker(_worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _loader(dataset, batch_size: int, cfg: TrainConfig, epoch: int, stream: int, drop_last: bool,
            world: int = 1) -> DataLoader:
    """The shuffled loader of one epoch; ``batch_size`` is the global batch. With ``world`` > 1
    processes, this rank's part (``batch_size // world`` images) of the same global batches."""
    g = torch.Generator()
    g.manual_seed(_derived_seed(cfg.seed, epoch, stream))
    common = dict(num_workers=cfg.num_workers, generator=g, worker_init_fn=_seed_worker if cfg.num_workers else None,
                  pin_memory=torch.device(cfg.device).type == "cuda")
    if world == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, **common)
    from .distributed import GlobalBatchSampler

    sampler = GlobalBatchSampler(dataset, batch_size, g, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size // world, sampler=sampler, drop_last=drop_last, **common)


def _cycle(loader: DataLoader):
    """Iterate ``loader`` forever, reshuffling at every pass (unlike itertools.cycle)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the anomaly loader yields no batch")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _image_size_of(dataset, name: str) -> tuple[int, int]:
    try:
        item = dataset[0]
    except IndexError:
        raise ValueError(f"{name} is empty") from None
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} items must start with a (3, H, W) image tensor, got {type(image).__name__}"
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else ''}")
    return tuple(image.shape[-2:])


def _check_dataset(dataset, name: str, cfg: TrainConfig, model_mean) -> None:
    if dataset is None:
        return
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    size = _image_size_of(dataset, name)
    if size != tuple(cfg.image_size):
        raise ValueError(f"{name} gives {size[0]}x{size[1]} images but TrainConfig.image_size is "
                         f"{cfg.image_size[0]}x{cfg.image_size[1]}: build the data set with image_size={cfg.image_size}")
    mean = getattr(dataset, "mean", None)
    if mean is not None and model_mean is not None and not np.allclose(mean, model_mean):
        warnings.warn(f"{name} is normalised with mean {tuple(mean)} but the {cfg.backbone} backbone expects "
                      f"{tuple(model_mean)}: build the data set with the backbone's mean/std", stacklevel=3)


def _write_lines(path: Path, records: list[dict]) -> None:
    """Rewrite the log from ``records`` atomically (a resumed run's log matches its checkpoint)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _append_line(path: Path, record: dict) -> None:
    # One write of a whole line, flushed and synced: a crash leaves whole lines behind.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (on the training device, in eval mode)."""

    checkpoint: Path
    log: Path
    history: list[dict] = field(default_factory=list)
    model: CKAAD | None = None

    @property
    def epochs(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0


def train(
    config: TrainConfig,
    train_set: Dataset,
    anomaly_set: Dataset | None = None,
    out_dir: str | os.PathLike = "runs/ckaad",
    eval_set: Dataset | None = None,
    resume: bool = False,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> TrainResult:
    """Train a CKAAD detector; write ``out_dir/checkpoint.pt`` and ``out_dir/log.jsonl``.

    Args:
        config: the run's :class:`TrainConfig`.
        train_set: normal training images; items start with a normalised (3, H, W) image
            (:class:`~ckaad_fast.data.MVTecDataset` ``split="train"``, :class:`~ckaad_fast.data.FolderDataset`, ...).
        anomaly_set: the coarse anomaly set (items start with an image), e.g.
            :class:`~ckaad_fast.data.AnomalyFolderDataset`. None, for a strategy that uses anomalies:
            the industrial protocol, elastic distortions of each normal batch. Ignored by ``recon``.
        out_dir: where the checkpoint and the log go (created).
        eval_set: a test set (items ``(image, label, mask, path)`` or ``(image, label, path)``) scored
            with :func:`ckaad_fast.evaluation.evaluate_model` every ``config.eval_every`` epochs and
            after the last; its metrics go into the log.
        resume: continue from ``out_dir/checkpoint.pt`` up to ``config.epochs`` (the run-defining
            fields must equal the checkpoint's; ``epochs``, ``device``, ``amp``, ``compile``,
            ``num_workers``, ``eval_every`` and ``weights`` may change).
        progress: show a tqdm bar per epoch with the running losses.
        overwrite: start afresh even if ``out_dir`` already holds a checkpoint.

    Under torchrun, call it on every rank (it joins torchrun's process group when none is running):
    see the module's docstring. ``config.batch_size`` is then the global batch, a CUDA device means
    ``cuda:LOCAL_RANK``, and only rank 0 reads and writes ``out_dir``; every rank returns the
    same history and its copy of the model.

    Each log line: ``{"epoch", "d_loss" (None without a discriminator), "g_loss", "recon_loss",
    "steps", "seconds", "eval": {metrics} or absent}``. Raises ValueError for bad data or
    configuration, FileExistsError / FileNotFoundError for the checkpoint, RuntimeError when a
    loss becomes non-finite (the last good checkpoint is kept).
    """
    from . import distributed as ddp
    from .evaluation import evaluate_model

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = config
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} was asked for but CUDA is not available")
    dinfo = ddp.init_distributed(device)  # a no-op outside torchrun
    world, main = dinfo.world_size, dinfo.is_main
    device = ddp.local_device(device)
    out = Path(out_dir)
    ckpt_path, log_path = out / CHECKPOINT_NAME, out / LOG_NAME

    def check_files() -> None:
        if resume and not ckpt_path.is_file():
            raise FileNotFoundError(f"cannot resume: {str(ckpt_path)!r} does not exist (run without resume first)")
        if not resume and ckpt_path.exists() and not overwrite:
            raise FileExistsError(f"{str(out)!r} already holds a checkpoint: resume it (resume=True / --resume), "
                                  "choose another output folder, or pass overwrite=True")

    ddp.run_on_main(check_files)  # rank 0's files decide, and every rank raises the same error
    if train_set is None or len(train_set) == 0:
        raise ValueError("train_set is empty")
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"TrainConfig.batch_size ({cfg.batch_size}) is larger than the training set "
                         f"({len(train_set)} images): the loader drops incomplete batches, so no step would run")
    if cfg.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size ({cfg.batch_size}) is the global batch and must be a multiple "
                         f"of the number of processes ({world}): each takes batch_size / {world} images")
    if anomaly_set is not None and len(anomaly_set) == 0:
        raise ValueError("anomaly_set is empty: pass None to use elastic pseudo-anomalies")
    if cfg.uses_anomalies and anomaly_set is not None and len(anomaly_set) < world and not (
            isinstance(anomaly_set, PseudoAnomalyDataset) and anomaly_set.normal_dataset is train_set):
        raise ValueError(f"anomaly_set has {len(anomaly_set)} images, fewer than the {world} processes: "
                         "each process needs at least one per step")
    if eval_set is not None:
        labels = getattr(eval_set, "labels", None)
        if labels is not None and len(set(int(v) for v in labels)) < 2:
            raise ValueError("eval_set must hold both normal and anomalous images")
    mean = cfg.normalization()[0]
    _check_dataset(train_set, "train_set", cfg, mean)
    _check_dataset(eval_set, "eval_set", cfg, mean)
    if cfg.uses_anomalies and anomaly_set is not None and not isinstance(anomaly_set, PseudoAnomalyDataset):
        _check_dataset(anomaly_set, "anomaly_set", cfg, mean)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    # -- model and state ---------------------------------------------------------------------
    history: list[dict] = []
    start_epoch = 0
    if resume:
        def load() -> dict:
            ckpt = load_checkpoint(ckpt_path)
            if not ckpt.get("train_config") or "rng" not in ckpt or "optimizers" not in ckpt:
                raise ValueError(f"{str(ckpt_path)!r} holds no training state to resume "
                                 "(it was not written by train())")
            saved = TrainConfig.from_dict(ckpt["train_config"])
            diff = [k for k in _RUN_FIELDS if getattr(saved, k) != getattr(cfg, k)]
            if diff:
                detail = ", ".join(f"{k}: checkpoint {getattr(saved, k)!r} vs {getattr(cfg, k)!r}" for k in diff)
                raise ValueError(f"cannot resume {str(ckpt_path)!r} with a different configuration ({detail})")
            return ckpt

        # Rank 0 reads the checkpoint and hands it to the others: out_dir need not be shared.
        ckpt = ddp.run_on_main(load)
        model = model_from_checkpoint(ckpt, map_location=device)
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
    else:
        _seed_everything(cfg.seed)
        model = CKAAD(cfg.model_config(), weights=cfg.weights).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # Each rank's own copy of the configuration names its own device (cuda:LOCAL_RANK).
    trainer = Trainer(model, cfg if world == 1 else dataclasses.replace(cfg, device=str(device)),
                      distributed=world > 1)
    if resume:
        trainer.load_state_dict(ckpt)
        _set_rng_state(ckpt["rng"])
        if main:
            _write_lines(log_path, history)
        del ckpt
    elif main:
        _write_lines(log_path, [])

    pseudo = paired = anomalies = None
    if cfg.uses_anomalies:
        if anomaly_set is None:
            pseudo = PseudoAnomalyDataset(train_set, alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, seed=cfg.seed)
        elif isinstance(anomaly_set, PseudoAnomalyDataset) and anomaly_set.normal_dataset is train_set:
            pseudo = anomaly_set
        else:
            anomalies = _Images(anomaly_set)
        if pseudo is not None:
            paired = _WithDistortion(pseudo)
    images = _Images(train_set)

    # -- epochs --------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if pseudo is not None:
            pseudo.set_epoch(epoch)
        loader = _loader(paired if paired is not None else images, cfg.batch_size, cfg, epoch, 0, drop_last=True,
                         world=world)
        anomaly_iter = None
        if anomalies is not None:
            # Global anomaly batch, a multiple of the number of processes.
            a_batch = min(cfg.batch_size, len(anomalies)) // world * world
            anomaly_iter = _cycle(_loader(anomalies, a_batch, cfg, epoch, 1, drop_last=True, world=world))
        sums = torch.zeros(3, device=device)
        steps = 0
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch}/{cfg.epochs}", disable=not (progress and main),
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            if paired is not None:
                normal, anomalous = batch
            else:
                normal, anomalous = batch, (next(anomaly_iter) if anomaly_iter is not None else None)
            sums += trainer.step(normal, anomalous)
            steps += 1
            if progress and (steps % 10 == 1 or steps == len(loader)):
                d, g, r = (sums / steps).tolist()
                post = {"G": f"{g:.4f}", "rec": f"{r:.4f}"}
                if trainer.discriminator is not None:
                    post = {"D": f"{d:.4f}", **post}
                bar.set_postfix(post)
        bar.close()
        # The mean over ranks of the per-rank mean losses: the single-process value.
        d, g, r = (ddp.all_reduce_mean(sums) / max(steps, 1)).tolist()
        if not all(math.isfinite(v) for v in (d, g, r)):
            raise RuntimeError(f"non-finite loss in epoch {epoch} (D {d}, G {g}, recon {r}); the checkpoint of "
                               f"epoch {epoch - 1} is kept. Try lower learning rates or amp=None")
        record: dict[str, Any] = {
            "epoch": epoch,
            "d_loss": d if trainer.discriminator is not None else None,
            "g_loss": g,
            "recon_loss": r,
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if eval_set is not None and cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            t1 = time.perf_counter()
            # Sharded in whole batches of the single-process size: the same maps, the same metrics.
            record["eval"] = evaluate_model(model, eval_set, batch_size=cfg.batch_size, device=device,
                                            progress=False, distributed=world > 1)
            record["eval_seconds"] = round(time.perf_counter() - t1, 3)
        history.append(record)
        if main:
            save_checkpoint(
                ckpt_path, model,
                train_config=cfg.to_dict(),
                epoch=epoch,
                history=history,
                rng=_rng_state(),
                **trainer.state_dict(),
            )
            _append_line(log_path, record)
        ddp.barrier()
        if progress and main:
            msg = f"epoch {epoch}/{cfg.epochs}: " + ("" if record["d_loss"] is None else f"D {d:.4f}  ") + \
                f"G {g:.4f}  recon {r:.4f}  ({record['seconds']:.1f}s)"
            if "eval" in record:
                msg += "  " + "  ".join(f"{k} {v:.4f}" for k, v in record["eval"].items() if isinstance(v, float))
            tqdm.write(msg)
    model.eval()
    return TrainResult(checkpoint=ckpt_path, log=log_path, history=history, model=model)
