"""The configuration of a training run, the paper's per-domain defaults, and the rule that turns
an earlier run's checkpoint plus a few overrides into the configuration of a resumed run.

Both the Python API and ``ckaad-fast train`` build their configuration with
:func:`resolve_config`, so the defaults and the resume rule live here and nowhere else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..data.registry import LAYOUT_TABLE, layout_spec
from ..errors import ArgumentError
from ..feature_memory import DEFAULT_CANDIDATES
from ..model import CHECKPOINT_NAME, DEFAULT_TOPK, ModelConfig, check_tiling, PlainConfig, checkpoint_file, load_checkpoint
from ..models import BACKBONES, backbone_spec
from ..precision import canonical_precision, check_device_usable
from ..strategies import STRATEGIES, get_strategy
from ..validation import bad, check_choice, check_image_size, check_layers, check_topk, is_int, is_number

__all__ = ["TrainConfig", "AMP_MODES", "PROTOCOLS", "DEFAULT_PROTOCOL", "RUN_FIELDS", "DOMAIN_DEFAULTS", "LAYOUT_DOMAINS", "LAYOUT_DEFAULTS",
           "CATEGORY_DEFAULTS", "LOG_NAME",
           "resolve_config"]

AMP_MODES = (None, "bf16", "fp16")
#: ``"ours"``: this library's choices where they differ from the authors' code on purpose;
#: ``"reference"``: the authors' behaviour (see :class:`TrainConfig`).
PROTOCOLS = ("ours", "reference")
DEFAULT_PROTOCOL = PROTOCOLS[0]
#: The file name of a run's log (one JSON line per epoch) in its output folder.
LOG_NAME = "log.jsonl"

#: Fields that define the run: a resumed run must have the same values as the checkpoint.
RUN_FIELDS = (
    "strategy", "backbone", "layers", "image_size", "batch_size", "ae_lr", "d_lr", "lam", "gamma",
    "alpha", "margin", "clip_norm", "betas", "seed", "topk", "sigma", "elastic_alpha", "elastic_sigma", "protocol",
    "tile_size", "tile_stride",
)

#: The paper's settings per domain: industrial data (MVTec AD, VisA) and medical class-folder data.
DOMAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "industrial": {"backbone": "wide_resnet50_2", "layers": (1, 2, 3), "ae_lr": 5e-3},
    "medical": {"backbone": "resnet18", "layers": (2, 3), "ae_lr": 1e-3},
}
#: The domain of each data-set layout, and what each layout's protocol adds to its domain's
#: defaults: views of :data:`ckaad_fast.data.LAYOUT_TABLE`, where both are written.
LAYOUT_DOMAINS = {name: spec.domain for name, spec in LAYOUT_TABLE.items()}
LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {name: dict(spec.defaults) for name, spec in LAYOUT_TABLE.items()}
#: The authors' exceptions for single categories: (layout, category) -> settings. (OCT's 10 epochs
#: cannot be told from a class-folder layout: pass --epochs 10 there.)
CATEGORY_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("mvtec", "carpet"): {"epochs": 10},
    ("mvtec", "transistor"): {"ae_lr": 1e-3},
}


_KIND = "TrainConfig"


def _bad(name: str, must: str, value) -> ValueError:
    return bad(_KIND, name, must, value)


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
        evaluate: whether the run evaluates on its data set's test split (``ckaad-fast train --eval``
            builds that split and passes it as ``eval_set``; kept by a resumed run). :func:`train`
            itself evaluates whenever it is given an ``eval_set``.
        topk: image score = mean of the top-k map values (None: mean of the map, the ISIC protocol).
        sigma: the anomaly map's Gaussian blur.
        elastic_alpha, elastic_sigma: the elastic distortion of the pseudo-anomalies.
        protocol: where a run may differ from the authors' code, ``"ours"`` (the default) or
            ``"reference"`` (theirs). With a coarse anomaly set, ours draws full anomaly batches
            only (``drop_last``), reshuffled at every pass, and weighs the generated features of
            normal and anomalous inputs alpha : 1 - alpha (Eq. 5-6), so the loss is the paper's
            whatever the two batch sizes; theirs keeps the last short batch, replays one shuffle
            for the whole epoch (``itertools.cycle``) and averages over the concatenated batch, so
            a small anomaly batch weighs less. (The data side, their bilinear mask resize, is the
            data set's ``mask_resize``; :mod:`ckaad_fast.experiments` sets both.)
        tile_size, tile_stride: tiling (:mod:`ckaad_fast.tiling`): train on square tiles of
            ``tile_size`` pixels every ``tile_stride`` pixels (default: a quarter's overlap) cut
            from each image at its own resolution, each at ``image_size``; an anomalous image's
            tiles are all anomalous. None: each image resized whole. The data sets are then built
            at their files' own size (:attr:`source_size`), and the checkpoint records the tiling.
        memory_candidates: a tiled run's image decision (:mod:`ckaad_fast.feature_memory`): before
            the first epoch the frozen backbone's features of every training image are kept in
            the checkpoint, and an image's score is the largest distance to them among the
            ``memory_candidates`` highest cells of its map (default
            :data:`~ckaad_fast.feature_memory.DEFAULT_CANDIDATES`; measured in docs/BENCHMARKS.md).
            0 or None: the top-k rule on the stitched map. Ignored without tiling.
        memory_norm_cell: with the memory, the candidates are picked from the map normalised per
            position (:mod:`ckaad_fast.map_norm`, cells of this many pixels) by the statistics of
            the training images' own maps, fitted after the last epoch (and before each
            evaluation): on an aligned object the holes' and edges' normal answer no longer
            outranks a defect on flat metal (16 px cells on the #36 plate: image AUROC 74-90
            against 59-75). None (the default) or 0: the map as it is, better on textures
            (gravel: 98.0 against 93.8 normalised; docs/BENCHMARKS.md).
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
    evaluate: bool = False
    topk: int | None = DEFAULT_TOPK
    sigma: float = 4.0
    elastic_alpha: float = 200.0
    elastic_sigma: float = 5.0
    protocol: str = DEFAULT_PROTOCOL
    tile_size: int | None = None
    tile_stride: int | None = None
    memory_candidates: int | None = DEFAULT_CANDIDATES
    # Off by default: it lifts an aligned object (the #36 plate: 59-75 -> 74-90 image AUROC) and
    # costs a texture whose statistics are the same everywhere (gravel seed 0: 98.0 -> 93.8).
    memory_norm_cell: int | None = None

    def __post_init__(self):
        check_choice(_KIND, "strategy", self.strategy, STRATEGIES)
        check_choice(_KIND, "backbone", self.backbone, BACKBONES)
        self.layers = check_layers(_KIND, self.layers)
        if self.weights is not None:
            if isinstance(self.weights, os.PathLike):
                self.weights = os.fspath(self.weights)
            if not isinstance(self.weights, str):
                raise _bad("weights", "be 'imagenet', 'none' or a path", self.weights)
        self.image_size = check_image_size(_KIND, self.image_size)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise _bad(name, "be an int >= 1", v)
        for name in ("ae_lr", "d_lr", "margin", "elastic_sigma"):
            v = getattr(self, name)
            if not is_number(v) or v <= 0:
                raise _bad(name, "be a finite number > 0", v)
        # sigma 0 is no blur, as in ModelConfig (the head takes it).
        for name in ("lam", "elastic_alpha", "sigma"):
            v = getattr(self, name)
            if not is_number(v) or v < 0:
                raise _bad(name, "be a finite number >= 0", v)
        for name in ("gamma", "alpha"):
            v = getattr(self, name)
            if not is_number(v) or not 0.0 <= v <= 1.0:
                raise _bad(name, "lie in [0, 1]", v)
        if self.clip_norm is not None and (not is_number(self.clip_norm) or self.clip_norm <= 0):
            raise _bad("clip_norm", "be a finite number > 0 or None", self.clip_norm)
        try:
            betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise _bad("betas", "be two numbers in [0, 1)", self.betas) from None
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise _bad("betas", "be two numbers in [0, 1)", self.betas)
        self.betas = betas
        if not is_int(self.seed):
            raise _bad("seed", "be an int", self.seed)
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise _bad("device", "name a torch device ('cpu', 'cuda', 'cuda:1')", self.device) from None
        if dev.type not in ("cpu", "cuda"):
            raise _bad("device", "be a CPU or CUDA device", self.device)
        self.device = str(self.device)
        # Any precision name of ckaad_fast.precision; stored in the checkpoints' compact form.
        try:
            name = canonical_precision(self.amp, "amp") if self.amp is not None else "float32"
        except ArgumentError:
            raise _bad("amp", "be a precision: None/float32, bfloat16 (bf16) or float16 (fp16)", self.amp) from None
        if name == "auto":
            raise _bad("amp", "name a precision, not auto (training's precision is chosen, not guessed)", self.amp)
        self.amp = {"float32": None, "bfloat16": "bf16", "float16": "fp16"}[name]
        if self.amp == "fp16" and dev.type != "cuda":
            raise _bad("amp", "not be 'fp16' on the CPU (use 'bf16')", self.amp)
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise _bad("compile", "be a bool or a torch.compile backend name", self.compile)
        if not is_int(self.num_workers) or self.num_workers < 0:
            raise _bad("num_workers", "be an int >= 0", self.num_workers)
        if not isinstance(self.evaluate, bool):
            raise _bad("evaluate", "be True or False", self.evaluate)
        if not is_int(self.eval_every) or self.eval_every < 0:
            raise _bad("eval_every", "be an int >= 0", self.eval_every)
        check_topk(_KIND, self.topk, self.image_size)
        check_choice(_KIND, "protocol", self.protocol, PROTOCOLS)
        self.tile_size, self.tile_stride = check_tiling(self.tile_size, self.tile_stride, self.image_size)
        for name in ("memory_candidates", "memory_norm_cell"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise _bad(name, "be an int >= 0 (0: off) or None", v)

    @property
    def source_size(self) -> tuple[int, int] | None:
        """The size to build the data sets at: :attr:`image_size`, or None (each file's own
        size) when the run tiles (the tiles are cut from the full image)."""
        return self.image_size if self.tile_size is None else None

    @property
    def precision(self) -> str:
        """:attr:`amp` as a precision name of :mod:`ckaad_fast.precision`."""
        return {None: "float32", "bf16": "bfloat16", "fp16": "float16"}[self.amp]

    # -- conversions (to_dict / from_dict come from PlainConfig) ---------------------------------
    def model_config(self) -> ModelConfig:
        """The :class:`ckaad_fast.model.ModelConfig` of the detector this run trains."""
        memory = (self.memory_candidates or None) if self.tile_size else None
        return ModelConfig(
            backbone=self.backbone, layers=self.layers, image_size=self.image_size,
            strategy=self.strategy, sigma=self.sigma, topk=self.topk, tile_size=self.tile_size,
            tile_stride=self.tile_stride, memory_candidates=memory,
            memory_norm_cell=(self.memory_norm_cell or None) if memory else None,
        )

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the backbone's weights expect: build the data sets with these."""
        spec = backbone_spec(self.backbone)
        return tuple(spec.mean), tuple(spec.std)

    @property
    def uses_anomalies(self) -> bool:
        """Whether the strategy's step takes a batch of anomalous images."""
        return get_strategy(self.strategy).uses_anomalies



def resolve_config(
    overrides: Mapping[str, Any] | None = None,
    *,
    layout: str | None = None,
    category: str | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TrainConfig:
    """The configuration of a run: ``overrides`` (field -> value; None values are ignored) on top
    of a base, which is

    - with ``resume_from`` (a run's output folder or its checkpoint) holding a checkpoint: the
      configuration that run was trained with, so that a resumed run keeps every option of the
      original one unless overridden;
    - otherwise the :class:`TrainConfig` defaults with the paper's defaults for ``layout``'s
      domain (:data:`LAYOUT_DOMAINS`, :data:`DOMAIN_DEFAULTS`), the layout's own
      (:data:`LAYOUT_DEFAULTS`) and the ``category``'s (:data:`CATEGORY_DEFAULTS`) on top.

    ``resume_from`` that holds no checkpoint yet falls back to the defaults (``train`` then says
    there is nothing to resume). Errors name the field (``TrainConfig.epochs must ...``).
    """
    base = {**TrainConfig().to_dict()}
    if layout is not None:
        spec = layout_spec(layout)
        base.update(DOMAIN_DEFAULTS[spec.domain])
        base.update(spec.defaults)
        base.update(CATEGORY_DEFAULTS.get((layout, category), {}))
    if resume_from is not None:
        path = checkpoint_file(resume_from)
        if path.is_dir() or not path.suffix:  # an output folder that does not exist yet
            path = path / CHECKPOINT_NAME
        if path.is_file():
            try:
                saved = load_checkpoint(path).get("train_config")
            except ValueError as e:
                raise ArgumentError("resume_from", str(e)) from None
            if not saved:
                raise ArgumentError("resume_from", f"{str(path)!r} holds no training configuration to resume")
            base = dict(saved)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = TrainConfig.from_dict({**base, **given})
    check_device_usable(cfg.device, "device")
    return cfg
