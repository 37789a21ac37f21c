"""The training strategies of the paper's Table 3, as one table.

Each :class:`Strategy` says, in one place, everything that differs between them: whether its step
takes a batch of anomalous images, which discriminator the model builds for it, and its
discriminator (D) and generator (G) losses. :class:`ckaad_fast.training.CKAAD` reads
``discriminator``; :class:`ckaad_fast.training.Trainer` reads the rest and has no other
knowledge of strategies. To add one, add a row to :data:`STRATEGY_TABLE`.

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
term on reconstructions of anomalous inputs (:func:`mixture`). When the two batches are in the
proportion alpha : 1 - alpha (equal batches and alpha = 0.5, the industrial protocol) this is
exactly the mean over the concatenated reconstructions, which is what runs, in one op call;
otherwise (e.g. a coarse anomaly set smaller than the batch) the two terms are computed
separately and weighted. alpha is not the elastic distortion's strength (``elastic_alpha``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["Strategy", "StepTensors", "STRATEGY_TABLE", "STRATEGIES", "DISCRIMINATORS", "FusedLosses",
           "get_strategy", "mixture", "bce_sum"]

#: Discriminator kinds a strategy can ask the model for.
DISCRIMINATORS = ("patch", "image")


@dataclass(frozen=True)
class StepTensors:
    """The tensors of one training step that the losses read.

    ``feats``: the backbone's features of the normal images, then of the anomalous ones (one
    tensor per layer); ``recon``: the auto-encoder's reconstructions of the same; ``n``: how
    many of the images are normal; ``alpha``: the weight of the normal inputs' reconstructions
    in every term over generated features (the configured alpha, or under
    ``protocol="reference"`` the normal images' share of the batch, which is the authors' mean
    over the concatenated batch).
    """

    feats: Sequence[torch.Tensor]
    recon: Sequence[torch.Tensor]
    n: int
    alpha: float = 0.5


class FusedLosses:
    """The loss functions of a step: the fused ops of :mod:`ckaad_fast.ops`, looked up at call
    time. Pass another object with the same three methods to the Trainer to compare."""

    def reconstruction(self, inputs, outputs):
        return ops.cosine_reconstruction_loss(inputs, outputs)

    def discriminator(self, s_normal, s_anomalous, s_generated, gamma, margin):
        return ops.discriminator_loss(s_normal, s_anomalous, s_generated, gamma, margin)

    def generator(self, s_generated):
        return ops.generator_loss(s_generated)


# D loss: (D, detached step tensors, config, losses) -> loss.
DLoss = Callable[[Callable, StepTensors, Any, Any], torch.Tensor]
# G loss: (frozen D or None, step tensors, reconstruction loss of the normal images, config, losses) -> loss.
GLoss = Callable[[Any, StepTensors, torch.Tensor, Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Strategy:
    """One training strategy: see the module's docstring for the paper's equations.

    ``discriminator``: "patch", "image" or None (no D: the auto-encoder is trained alone);
    ``d_loss``: None exactly when there is no discriminator.
    """

    name: str
    summary: str
    uses_anomalies: bool
    discriminator: str | None
    g_loss: GLoss
    d_loss: DLoss | None = None

    def __post_init__(self):
        if self.discriminator not in (None, *DISCRIMINATORS):
            raise ValueError(f"discriminator must be None or one of {DISCRIMINATORS}, got {self.discriminator!r}")
        if (self.discriminator is None) != (self.d_loss is None):
            raise ValueError(f"strategy {self.name!r}: a D loss needs a discriminator and a discriminator a D loss")


def bce_sum(scores: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """Sum over layers of the mean BCE-with-logits of every score against ``target`` (gan)."""
    total = None
    for s in scores:
        s = s.float()
        term = F.binary_cross_entropy_with_logits(s, torch.full_like(s, target))
        total = term if total is None else total + term
    return total


def mixture(term: Callable[[list], torch.Tensor], scores: Sequence[torch.Tensor], n_normal: int,
            alpha: float) -> torch.Tensor:
    """alpha * term(generated from normal) + (1 - alpha) * term(generated from anomalous), where
    ``scores`` hold the normal ones first. One call when the batch proportion already is alpha."""
    total = scores[0].shape[0]
    if n_normal == total or abs(n_normal / total - alpha) <= 1e-9:
        return term(list(scores))
    return alpha * term([s[:n_normal] for s in scores]) + (1 - alpha) * term([s[n_normal:] for s in scores])


# -- the losses of each strategy ---------------------------------------------------------------
def _energy_d_loss(D, x: StepTensors, cfg, losses) -> torch.Tensor:
    # One D call over [F+, F-, F~]: normal features, anomalous features, every reconstruction.
    scores = D([torch.cat([f, r]) for f, r in zip(x.feats, x.recon)])
    n, total = x.n, x.feats[0].shape[0]
    s_n = [s[:n] for s in scores]
    s_a = [s[n:total] for s in scores]
    s_gen = [s[total:] for s in scores]
    return mixture(lambda g: losses.discriminator(s_n, s_a, g, cfg.gamma, cfg.margin), s_gen, n, x.alpha)


def _energy_g_loss(D, x: StepTensors, rec, cfg, losses) -> torch.Tensor:
    return rec + cfg.lam * mixture(losses.generator, D(x.recon), x.n, x.alpha)


def _gan_d_loss(D, x: StepTensors, cfg, losses) -> torch.Tensor:
    # The vanilla GAN's discriminator sees normal features and reconstructions only.
    n = x.n
    scores = D([torch.cat([f[:n], r]) for f, r in zip(x.feats, x.recon)])
    s_real = [s[:n] for s in scores]
    s_gen = [s[n:] for s in scores]
    return bce_sum(s_real, 1.0) + mixture(lambda s: bce_sum(s, 0.0), s_gen, n, x.alpha)


def _gan_g_loss(D, x: StepTensors, rec, cfg, losses) -> torch.Tensor:
    return rec + cfg.lam * mixture(lambda s: bce_sum(s, 1.0), D(x.recon), x.n, x.alpha)


def _recon_sub_g_loss(D, x: StepTensors, rec, cfg, losses) -> torch.Tensor:
    n = x.n
    return rec - cfg.lam * losses.reconstruction([f[n:] for f in x.feats], [r[n:] for r in x.recon])


def _recon_g_loss(D, x: StepTensors, rec, cfg, losses) -> torch.Tensor:
    return rec


#: Every strategy, the paper's method first.
STRATEGY_TABLE: dict[str, Strategy] = {s.name: s for s in (
    Strategy("cka_patch", "the paper's method: patch-level energy discriminator (Eq. 11-13)",
             uses_anomalies=True, discriminator="patch", d_loss=_energy_d_loss, g_loss=_energy_g_loss),
    Strategy("cka_img", "image-level energy discriminator (Eq. 8-9)",
             uses_anomalies=True, discriminator="image", d_loss=_energy_d_loss, g_loss=_energy_g_loss),
    Strategy("gan", "vanilla GAN whose discriminator never sees the anomalies (Eq. 7)",
             uses_anomalies=True, discriminator="patch", d_loss=_gan_d_loss, g_loss=_gan_g_loss),
    Strategy("recon_sub", "reconstruction loss of normal minus lam times that of anomalous images (Eq. 4)",
             uses_anomalies=True, discriminator=None, g_loss=_recon_sub_g_loss),
    Strategy("recon", "reconstruction of normal images only (Eq. 2)",
             uses_anomalies=False, discriminator=None, g_loss=_recon_g_loss),
)}
#: The names of :data:`STRATEGY_TABLE`, in its order.
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_TABLE)


def get_strategy(name: str) -> Strategy:
    """The strategy named ``name`` (a ValueError naming the choices for any other)."""
    try:
        return STRATEGY_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}") from None
