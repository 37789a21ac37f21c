"""The CKAAD detector as one module: frozen backbone, auto-encoder, discriminators, and scoring
through the fused ops; plus checkpoints that are safe to load.

``CKAAD(config)(images)`` returns ``(scores, maps)``: the image scores (B,) and anomaly maps
(B, H, W) of Eq. 14, computed by :func:`ckaad_fast.ops.anomaly_map` and
:func:`ckaad_fast.ops.image_score`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import ops
from .atomic import atomic_torch_save
from .models import build_backbone
from .models.autoencoder import FeatureAutoEncoder
from .models.discriminator import MultiLayerImageDiscriminator, MultiLayerPatchDiscriminator
from .profiling import nvtx_range
from .strategies import get_strategy

__all__ = ["CKAAD", "ModelConfig", "PlainConfig", "CHECKPOINT_NAME", "checkpoint_file", "fingerprint", "save_checkpoint", "load_checkpoint",
           "model_from_checkpoint"]

CHECKPOINT_FORMAT = "ckaad_fast.checkpoint"
CHECKPOINT_VERSION = 1
#: The file name of a run's checkpoint in its output folder (``ckaad-fast train --out``).
CHECKPOINT_NAME = "checkpoint.pt"


class PlainConfig:
    """Round-trips a configuration dataclass through plain types (lists for tuples), which JSON
    and ``torch.load(weights_only=True)`` both accept."""

    _kind = "configuration"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls._kind} keys {sorted(unknown)}")
        return cls(**d)


@dataclass
class ModelConfig(PlainConfig):
    """What defines a trained detector: enough to rebuild it and score as it was evaluated."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    image_size: tuple[int, int] = (256, 256)
    strategy: str = "cka_patch"
    sigma: float = 4.0
    topk: int | None = 100
    border: str = "reflect"
    # Input normalisation; None takes the backbone's own (ImageNet's for ResNets, 0.5 for Lite0).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _kind = "model configuration"

    def __post_init__(self):
        get_strategy(self.strategy)  # a ValueError naming the choices for an unknown one
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(v) for v in self.image_size)
        self.layers = tuple(int(v) for v in self.layers)
        self.mean = None if self.mean is None else tuple(float(v) for v in self.mean)
        self.std = None if self.std is None else tuple(float(v) for v in self.std)


class CKAAD(nn.Module):
    """Backbone F (frozen), auto-encoder G and, for the adversarial strategies, discriminator D.

    ``weights`` is passed to :func:`ckaad_fast.models.build_backbone` ('imagenet', 'none' or a
    state_dict path); a checkpoint carries the backbone's weights, so loading one needs neither.
    """

    def __init__(self, config: ModelConfig, weights: str | os.PathLike | None = "imagenet"):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, weights=weights, layers=config.layers)
        bb = self.backbone
        if config.mean is None:
            config.mean = tuple(bb.mean)
        if config.std is None:
            config.std = tuple(bb.std)
        # The backbone table's recipe: for the ResNets, the authors' auto-encoder.
        self.autoencoder = FeatureAutoEncoder.for_backbone(config.backbone, config.layers)
        kind = get_strategy(config.strategy).discriminator
        if kind == "patch":
            self.discriminator = MultiLayerPatchDiscriminator(bb.channels)
        elif kind == "image":
            h, w = config.image_size
            sizes = [(-(-h // s), -(-w // s)) for s in bb.strides]
            self.discriminator = MultiLayerImageDiscriminator(bb.channels, sizes)
        else:
            self.discriminator = None

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with nvtx_range("backbone"):
            return self.backbone(images)

    def reconstruct(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        with nvtx_range("auto-encoder"):
            return self.autoencoder(features)

    def score_features(self, features, reconstructions, out_size=None):
        """Anomaly maps (B, H, W) float32 and image scores (B,) from features and reconstructions."""
        cfg = self.config
        out_size = out_size or cfg.image_size
        maps = ops.anomaly_map(features, reconstructions, out_size=out_size, sigma=cfg.sigma, border=cfg.border)
        return ops.image_score(maps, cfg.topk), maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, H, W)) for a batch of normalised images (B, 3, H, W)."""
        feats = self.features(images)
        recon = self.reconstruct(feats)
        return self.score_features(feats, recon, out_size=tuple(images.shape[-2:]))


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def fingerprint(model: CKAAD) -> str:
    """SHA-256 of a detector's configuration and weights: equal exactly when two models score alike
    (whatever device or memory layout they sit in). Results folders record it (scoring's run
    manifest) so that a resume never mixes the rows of two models."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, model: CKAAD, **state) -> None:
    """Write ``model`` (weights and configuration) and any extra ``state`` (optimisers, epoch,
    RNG states: tensors, numbers, strings and containers of them) to ``path`` atomically."""
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": model.config.to_dict(),
            "model": model.state_dict(),
            **state,
        },
        path,
    )


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` names: itself, or :data:`CHECKPOINT_NAME` in a run's output folder."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True`` (no arbitrary unpickling), checking that
    it is one of ours; errors name the path and say what is wrong. ``path`` may be a run's output
    folder, which holds :data:`CHECKPOINT_NAME`."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means the same thing to a user
        raise ValueError(
            f"{str(path)!r} is not a loadable ckaad_fast checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            "checkpoints are loaded with weights_only=True, so files holding arbitrary Python objects are refused"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a ckaad_fast checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}, this library reads {CHECKPOINT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict | str | os.PathLike, map_location="cpu") -> CKAAD:
    """Rebuild the detector saved in a checkpoint (a path or a dict from :func:`load_checkpoint`)."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location)
    config = ModelConfig.from_dict(ckpt["config"])
    with warnings.catch_warnings():
        # The backbone is built empty and filled from the checkpoint: no random-weights warning.
        warnings.simplefilter("ignore")
        model = CKAAD(config, weights="none")
    model.load_state_dict(ckpt["model"])
    return model.to(map_location) if map_location is not None else model
