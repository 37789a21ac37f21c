"""The detector that scores, its configuration, and checkpoints that are safe to load.

``Detector(config)(images)`` returns ``(scores, maps)``: the image scores (B,) and anomaly maps
(B, H, W) of Eq. 14, through the one inference head (:mod:`ckaad_fast.head`). A checkpoint
written by training also holds the discriminator's weights; :func:`model_from_checkpoint` leaves
them out (scoring never calls it), :func:`ckaad_fast.training.ckaad_from_checkpoint` keeps them.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .atomic import atomic_torch_save
from .data.images import MAX_UPSCALE
from .head import InferenceHead, tiled_forward
from .models import BACKBONES, build_backbone
from .models.autoencoder import FeatureAutoEncoder
from .models.safe_load import refusal_reason
from .precision import autocast, resolve_precision
from .profiling import nvtx_range
from .errors import ArgumentError
from .feature_memory import DEFAULT_EDGE
from .memory_decision import MAX_MEMORY_BYTES, MEMORY_KEY, MEMORY_NORM_KEYS, MemoryDecision, check_memory
from .records import PlainConfig
from .tiling import Tiling, tiling_of
from .validation import bad, check_choice, check_image_size, check_layers, check_topk, is_number

__all__ = ["Detector", "ModelConfig", "PlainConfig", "DEFAULT_TOPK", "CHECKPOINT_NAME", "checkpoint_file", "fingerprint", "save_checkpoint", "load_checkpoint",
           "model_from_checkpoint", "config_from_checkpoint", "checkpoint_fingerprint", "fill_from_checkpoint", "TRAINING_ONLY_PREFIXES", "check_tiling", "check_recorded_tiling", "MEMORY_KEY",
           "MAX_MEMORY_BYTES", "MEMORY_NORM_KEYS", "check_memory"]

CHECKPOINT_FORMAT = "ckaad_fast.checkpoint"
CHECKPOINT_VERSION = 1
#: The file name of a run's checkpoint in its output folder (``ckaad-fast train --out``).
CHECKPOINT_NAME = "checkpoint.pt"


#: The image score's default top-k: the mean of the 100 largest map values (the one owner: the
#: training configuration, the demo and the execution plan read it from here).
DEFAULT_TOPK = 100


@dataclass
class ModelConfig(PlainConfig):
    """What defines a trained detector: enough to rebuild it and score as it was evaluated."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (1, 2, 3)
    image_size: tuple[int, int] = (256, 256)
    strategy: str = "cka_patch"
    sigma: float = 4.0
    topk: int | None = DEFAULT_TOPK
    border: str = "reflect"
    # Input normalisation; None takes the backbone's own (ImageNet's for ResNets, 0.5 for Lite0).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Tiling (ckaad_fast.tiling): square tiles of tile_size pixels every tile_stride pixels, cut
    # from each image at its own resolution and scored at image_size; None: the whole image is
    # resized to image_size. Recorded so that scoring tiles the way training did.
    tile_size: int | None = None
    tile_stride: int | None = None
    # The image decision of a tiled model (ckaad_fast.feature_memory): the map's memory_candidates
    # highest cells (memory_edge cells along each side never proposed) looked up in a memory of
    # normal features the checkpoint carries. None: the top-k rule on the map.
    memory_candidates: int | None = None
    memory_edge: int = DEFAULT_EDGE
    # The maps normalised per position (ckaad_fast.map_norm, cells of memory_norm_cell pixels) by
    # the training images' own maps before the memory's candidates are picked; None: as they are.
    memory_norm_cell: int | None = None
    _kind = "model configuration"

    def __post_init__(self):
        # Checked here, so that a bad checkpoint fails when it is loaded, naming the field, and
        # never after results were written.
        # The strategy is training's business (it picks the discriminator); scoring never reads
        # it, and training checks the name when it builds the model.
        if not isinstance(self.strategy, str) or not self.strategy:
            raise bad(_KIND, "strategy", "be a strategy name", self.strategy)
        check_choice(_KIND, "backbone", self.backbone, BACKBONES)
        self.layers = check_layers(_KIND, self.layers)
        self.image_size = check_image_size(_KIND, self.image_size)
        if not is_number(self.sigma) or self.sigma < 0:
            raise bad(_KIND, "sigma", "be a finite number >= 0", self.sigma)
        check_topk(_KIND, self.topk, self.image_size)
        check_choice(_KIND, "border", self.border, BORDERS)
        self.mean = _triple("mean", self.mean, positive=False)
        self.std = _triple("std", self.std, positive=True)
        if not isinstance(self.extra, dict):
            raise bad(_KIND, "extra", "be a mapping", self.extra)
        self.tile_size, self.tile_stride = check_tiling(self.tile_size, self.tile_stride, self.image_size)
        self.memory_candidates, self.memory_edge = check_memory(_KIND, self.memory_candidates, self.memory_edge,
                                                                self.tile_size, self.memory_norm_cell)

    @property
    def memory_scale(self) -> float:
        """How much the feature memory enlarges a full-size image: as the tiles are enlarged to
        the model's input."""
        return self.image_size[0] / self.tile_size

    @property
    def tiling(self) -> Tiling | None:
        """The :class:`~ckaad_fast.tiling.Tiling` images are scored with, or None."""
        return tiling_of(self.tile_size, self.tile_stride)

    @property
    def source_size(self) -> tuple[int, int] | None:
        """The size data sets read images at: the model's input, or None (each file's own size)
        when the model tiles."""
        return self.image_size if self.tile_size is None else None


def check_recorded_tiling(config: ModelConfig, tile_size=None, tile_stride=None) -> None:
    """An :class:`~ckaad_fast.errors.ArgumentError` when ``tile_size`` or ``tile_stride`` (None:
    not given) differ from the tiling ``config`` records: a model scores the way it was trained."""
    recorded = {"tile_size": config.tile_size, "tile_stride": config.tile_stride}
    for name, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
        if value is not None and value != recorded[name]:
            what = (f"tiles of {config.tile_size} px every {config.tile_stride} px" if config.tile_size
                    else "whole images resized, no tiling")
            raise ArgumentError(name, f"{value} differs from the checkpoint's tiling ({what}); a model scores the "
                                "way it was trained: leave the option out, or train with this tiling")


def check_tiling(tile_size, tile_stride, image_size) -> tuple[int | None, int | None]:
    """(tile_size, tile_stride) checked, the stride's default filled in (:func:`ckaad_fast.tiling.tiling_of`):
    one-line errors naming ``tile_size`` or ``tile_stride``. Tiles are square, so a tiled
    model's input must be square too."""
    tiling = tiling_of(tile_size, tile_stride)
    if tiling is None:
        return None, None
    if image_size[0] != image_size[1]:
        raise ArgumentError("tile_size", f"tiles are square, so the model's input must be too (image_size is "
                            f"{image_size[0]}x{image_size[1]})")
    if tiling.size * MAX_UPSCALE < image_size[0]:
        # The rule every file obeys (data.images.MAX_UPSCALE): enlarging more invents the detail a
        # defect would show.
        raise ArgumentError("tile_size", f"{tiling.size} pixels would be enlarged {image_size[0] / tiling.size:g}x to "
                            f"the model's input of {image_size[0]}: at most {MAX_UPSCALE}x (a tile of at least "
                            f"{-(-image_size[0] // MAX_UPSCALE)} pixels)")
    return tiling.size, tiling.stride


#: The blur borders of :func:`ckaad_fast.ops.anomaly_map`.
BORDERS = ("reflect", "mirror")
_KIND = "ModelConfig"


def _triple(name: str, value, positive: bool):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise bad(_KIND, name, "be None or three numbers", value) from None
    if len(out) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise bad(_KIND, name, "be None or three finite numbers" + (" > 0" if positive else ""), value)
    return out


class Detector(MemoryDecision, nn.Module):
    """The detector that scores: backbone F (frozen), auto-encoder G and the inference head
    (:class:`~ckaad_fast.head.InferenceHead`). Training's extra parts (discriminators, losses,
    strategies) live in :mod:`ckaad_fast.training` (:class:`~ckaad_fast.training.CKAAD`).

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
        self.head = InferenceHead(config.sigma, config.border, config.topk)
        self._memory = None  # the FeatureMemory built from the buffer MEMORY_KEY (MemoryDecision.memory)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with nvtx_range("backbone"):
            return self.backbone(images)

    def reconstruct(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        with nvtx_range("auto-encoder"):
            return self.autoencoder(features)

    def forward(self, images: torch.Tensor, precision: torch.dtype | str = torch.float32,
                head: InferenceHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, H, W)), float32, for a batch of normalised images (B, 3, H, W):
        the backbone and the auto-encoder in ``precision`` (a name of
        :data:`ckaad_fast.precision.PRECISIONS` or a torch dtype; float32 by default), then the
        head (``head``, else the model's own) in float32. Every scoring path calls this."""
        if not isinstance(precision, torch.dtype):
            precision = resolve_precision(precision, images.device)
        with autocast(images.device, precision):
            feats = self.features(images)
            recon = self.reconstruct(feats)
        return (head or self.head)(feats, recon, images.shape[-2:])

    @property
    def tiling(self) -> Tiling | None:
        """The tiling this model scores full-size images with (None: images are resized whole)."""
        return self.config.tiling

    def tiled(self, images: torch.Tensor, precision: torch.dtype | str = torch.float32, head: InferenceHead | None = None,
              batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, H, W)) of full-size normalised ``images`` for a tiled model
        (``config.tiling``): :meth:`forward` on each image's tiles, ``batch`` tiles at a time,
        the maps stitched at the images' resolution (:func:`ckaad_fast.head.tiled_forward`)."""
        tiling = self.config.tiling
        if tiling is None:
            raise ValueError("this model does not tile (its configuration has no tile_size)")
        h = head or self.head
        return tiled_forward(lambda x: self(x, precision, h), images, tiling, self.config.image_size, h.topk, batch,
                             image_score=self.memory_scores if self.config.memory_candidates else None)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def fingerprint(model: Detector) -> str:
    """SHA-256 of a detector's configuration and the weights that score (training's parts left
    out): equal exactly when two models score alike (whatever device or memory layout they sit
    in, and whether training's model or the scoring detector holds them). Results folders record
    it (scoring's run manifest) so that a resume never mixes the rows of two models."""
    return _weights_hash(model.config, model.state_dict())


def checkpoint_fingerprint(ckpt: dict) -> str:
    """:func:`fingerprint` of the detector a checkpoint dict holds, from its configuration and
    tensors, without building the network (what a runtime engine's cached graph is keyed by; a
    test holds the two equal)."""
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise ValueError("the checkpoint holds no weights: it was not written by save_checkpoint")
    return _weights_hash(config_from_checkpoint(ckpt), state)


def _weights_hash(config: ModelConfig, state: dict) -> str:
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(state.items()):
        if name.startswith(TRAINING_ONLY_PREFIXES):
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, model: Detector, **state) -> None:
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
            f"{str(path)!r} is not a ckaad_fast checkpoint and may be unsafe: torch.load(weights_only=True) "
            f"refused it ({refusal_reason(e)}). Checkpoints written by ckaad-fast train or save_checkpoint "
            "always load this way; do not load this file with weights_only=False unless you trust its source"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a ckaad_fast checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}, this library reads {CHECKPOINT_VERSION}")
    return ckpt


#: State-dict prefixes of training's parts, which a checkpoint holds and the Detector does not.
TRAINING_ONLY_PREFIXES = ("discriminator.",)


def config_from_checkpoint(ckpt: dict) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint dict holds; a ValueError says what is wrong."""
    missing = [k for k in ("config", "model") if k not in ckpt]
    if missing:
        raise ValueError(f"the checkpoint holds no {' and no '.join(missing)}: it was not written by save_checkpoint")
    if not isinstance(ckpt["config"], dict):
        raise ValueError("the checkpoint's configuration is not a mapping")
    try:
        return ModelConfig.from_dict(ckpt["config"])
    except TypeError as e:
        raise ValueError(f"the checkpoint's configuration is invalid: {e}") from None


def fill_from_checkpoint(model: nn.Module, ckpt: dict, map_location="cpu", skip: tuple[str, ...] = ()):
    """Load the checkpoint's weights into ``model`` (every key, except those starting with one of
    ``skip``); a ValueError when they do not fit. Returns the model on ``map_location``."""
    state = ckpt["model"]
    if skip and isinstance(state, dict):
        state = {k: v for k, v in state.items() if not k.startswith(skip)}
    if isinstance(state, dict) and isinstance(model, Detector):
        model.make_room_for_memory(state)  # its buffers take the stored shapes, then load
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the checkpoint's weights do not fit its configuration ({first[:300]})") from None
    return model.to(map_location) if map_location is not None else model


def model_from_checkpoint(ckpt: dict | str | os.PathLike, map_location="cpu") -> Detector:
    """Rebuild the :class:`Detector` saved in a checkpoint (a path or a dict from
    :func:`load_checkpoint`), without training's parts. A checkpoint whose configuration is
    invalid, or whose weights do not fit it, raises a ValueError saying so before anything is
    scored."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location)
    config = config_from_checkpoint(ckpt)
    with warnings.catch_warnings():
        # The backbone is built empty and filled from the checkpoint: no random-weights warning.
        warnings.simplefilter("ignore")
        model = Detector(config, weights="none")
    return fill_from_checkpoint(model, ckpt, map_location, skip=TRAINING_ONLY_PREFIXES)
