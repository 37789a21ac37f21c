"""The training step: one discriminator update and one auto-encoder (generator) update.

One step (:meth:`Trainer.step`), as in the authors' loop:

1. The frozen backbone (always in eval mode, no graph) gives the features F of the normal batch
   and of the anomalous batch; the auto-encoder G reconstructs both, F~ = G(F), in one pass (its
   InstanceNorm works per image, so batching them together changes nothing).
2. Discriminator step (strategies with a discriminator only): the strategy's D loss on detached
   inputs, Adam, gradients clipped to ``clip_norm``.
3. Generator step, with the just-updated D on the same (not recomputed) reconstructions:
   ``cosine_reconstruction_loss(F_normal, F~_normal)`` and the strategy's G loss on top.

Under ``protocol="reference"`` the terms over generated features are the mean over the whole
concatenated batch, as in the authors' code: the step's ``StepTensors.alpha`` is the normal
images' share of the batch instead of the configured mixture weight.

What each strategy computes is in :mod:`ckaad_fast.strategies`; nothing here depends on which
strategy runs.
"""
from __future__ import annotations

from typing import Any

import torch

from ..precision import resolve_precision
from ..profiling import nvtx_range
from ..strategies import FusedLosses, StepTensors, get_strategy
from .config import TrainConfig
from .module import CKAAD

__all__ = ["Trainer"]


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
        self.strategy = get_strategy(config.strategy)
        self.discriminator = model.discriminator if self.strategy.d_loss is not None else None
        betas = tuple(config.betas)
        self.opt_ae = torch.optim.Adam(model.autoencoder.parameters(), lr=config.ae_lr, betas=betas)
        self.opt_d = (
            torch.optim.Adam(self.discriminator.parameters(), lr=config.d_lr, betas=betas)
            if self.discriminator is not None else None
        )
        fp16 = config.amp == "fp16"
        self.scaler_ae = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        dtype = resolve_precision(config.precision, self.device, "amp")
        self.amp_dtype = None if dtype == torch.float32 else dtype
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

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def step(self, normal: torch.Tensor, anomalous: torch.Tensor | None = None) -> torch.Tensor:
        strategy = self.strategy
        if strategy.uses_anomalies and (anomalous is None or anomalous.shape[0] == 0):
            raise ValueError(f"strategy {strategy.name!r} needs a batch of anomalous images")
        normal = self._to_device(normal)
        n = normal.shape[0]
        images = torch.cat([normal, self._to_device(anomalous)]) if strategy.uses_anomalies else normal

        with self._autocast():
            with torch.no_grad():
                feats = self.model.features(images)
            with nvtx_range("auto-encoder"):
                recon = self._ae(feats)
            recon = [r if r.dtype == f.dtype else r.to(f.dtype) for r, f in zip(recon, feats)]
        reference = self.config.protocol == "reference" and strategy.uses_anomalies
        x = StepTensors(feats, recon, n, n / images.shape[0] if reference else self.config.alpha)
        self._last = x  # for energies(): the last step's features, kept until the next step
        d_loss = self._discriminator_step(x) if self.discriminator is not None else None
        g_loss, rec = self._generator_step(x)
        zero = g_loss.new_zeros(())
        return torch.stack([(zero if d_loss is None else d_loss).detach().float(), g_loss.detach().float(),
                            rec.detach().float()])

    def _discriminator_step(self, x: StepTensors) -> torch.Tensor:
        with nvtx_range("discriminator step"):
            self.discriminator.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            with self._autocast():
                detached = StepTensors(x.feats, [r.detach() for r in x.recon], x.n, x.alpha)
                d_loss = self.strategy.d_loss(self._d, detached, self.config, self.losses)
            self._update(d_loss, self.opt_d, self.scaler_d, self.discriminator.parameters())
        return d_loss

    def _generator_step(self, x: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:
        with nvtx_range("generator step"):
            if self.discriminator is not None:
                # D is not trained here: its weights need no gradient (G's still flow through it).
                self.discriminator.requires_grad_(False)
            self.opt_ae.zero_grad(set_to_none=True)
            with self._autocast():
                n = x.n
                rec = self.losses.reconstruction([f[:n] for f in x.feats], [r[:n] for r in x.recon])
                g_loss = self.strategy.g_loss(self._d_frozen, x, rec, self.config, self.losses)
            self._update(g_loss, self.opt_ae, self.scaler_ae)
            if self.discriminator is not None:
                self.discriminator.requires_grad_(True)
        return g_loss, rec

    @torch.no_grad()
    def energies(self) -> dict[str, float] | None:
        """The discriminator's mean score (its energy, or its logit for gan) on the last step's
        normal features, their reconstructions and the anomalous features (when the step had
        any): what the adversarial game does, for training curves. None without a discriminator."""
        x = getattr(self, "_last", None)
        if self.discriminator is None or x is None:
            return None
        n, total = x.n, x.feats[0].shape[0]
        # In eval mode: no normalisation statistics updated, no random numbers drawn, so watching
        # the game does not change it (training is the same with or without the curves).
        was_training = self.discriminator.training
        self.discriminator.eval()
        try:
            with self._autocast():
                scores = self.discriminator([torch.cat([f[:n], r[:n], f[n:]]) for f, r in zip(x.feats, x.recon)])
        finally:
            self.discriminator.train(was_training)

        def mean(lo, hi):
            return float(sum(s[lo:hi].float().mean() for s in scores) / len(scores))

        out = {"normal": mean(0, n), "reconstructed": mean(n, 2 * n)}
        if total > n:
            out["anomalous"] = mean(2 * n, 2 * n + total - n)
        return out

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

