"""The training loop: :func:`train` runs the epochs of one run and keeps its checkpoint and log.

Several processes (``torchrun``; see :mod:`ckaad_fast.distributed`): :func:`train` called on every
rank of a process group (it joins the one torchrun describes when none is running yet) trains one
model with DistributedDataParallel. ``batch_size`` stays the *global* batch: each of the N
processes takes ``batch_size / N`` images of every global batch (``batch_size`` must be a multiple
of N), and the anomaly batch is ``min(batch_size, n_anomalies)`` rounded down to a multiple of N.
The loaders (a :class:`~ckaad_fast.distributed.GlobalBatchSampler` each, the normal one and the
anomalous one cycling independently) deal the global batches a single process would draw, and
DDP averages the gradients of the per-rank mean losses, which is the gradient of the global mean.
So the same configuration gives the same training on 1 or N processes (up to float rounding), the
learning rates need no change, and a checkpoint resumes on any number of processes. Logged losses
are averaged over the ranks (equal to the single-process ones); evaluation is sharded and
gathered (:func:`ckaad_fast.evaluation.evaluate_model` with ``distributed=True``); rank 0 alone
reads the checkpoint (and broadcasts it) and writes the checkpoint and the log.

Reproducibility: the seed fixes the model's initialisation, every loader's order (a generator
seeded from (seed, epoch)), the pseudo-anomalies and the global RNGs. ``out_dir/checkpoint.pt``
(written atomically after every epoch) holds the weights, both configurations, the optimiser and
grad-scaler states, the epoch, the RNG states and the history, all loadable with
``torch.load(weights_only=True)``; resuming from it gives bit-identical weights to an
uninterrupted run on the CPU.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import distributed as ddp
from ..atomic import append_line, atomic_write_lines, remove_stale_temporaries
from ..data import PseudoAnomalyDataset
from ..evaluation import evaluate_model
from ..precision import check_device_usable
from ..tiling import tiling_of
from ..model import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import LOG_NAME, RUN_FIELDS, TrainConfig
from .curves import Curves
from .module import CKAAD, ckaad_from_checkpoint
from .loaders import Images, TileImages, WithDistortion, cycle, epoch_loader, rng_state, seed_everything, set_rng_state
from .trainer import Trainer
from ..records import differences

__all__ = ["TrainResult", "train"]


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
        config: the run's :class:`TrainConfig` (see :func:`~ckaad_fast.training.resolve_config`
            for the paper's defaults and the configuration of a resumed run).
        train_set: normal training images; items start with a normalised (3, H, W) image
            (:class:`~ckaad_fast.data.MVTecDataset` ``split="train"``, :class:`~ckaad_fast.data.FolderDataset`, ...).
        anomaly_set: the coarse anomaly set (items start with an image), e.g. from
            :func:`~ckaad_fast.data.coarse_anomaly_set`. None, for a strategy that uses anomalies:
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
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = config
    device = check_device_usable(cfg.device, "device")
    dinfo = ddp.init_distributed(device)  # a no-op outside torchrun
    run = _Run(cfg, Path(out_dir), ddp.local_device(device), dinfo.world_size, dinfo.is_main, progress)
    ddp.run_on_main(lambda: run.check_files(resume, overwrite))  # rank 0's files decide; every rank raises
    full_size_train = _MemoryImages(cfg, train_set, run.device, progress and run.main)  # each whole image
    train_set, anomaly_set = _tiles(cfg, train_set, anomaly_set)
    _check_inputs(cfg, train_set, anomaly_set, eval_set, run.world)
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        # What a save killed half-way left behind (the checkpoint or log it was writing survives).
        for name in (CHECKPOINT_NAME, LOG_NAME):
            remove_stale_temporaries(run.out, name)
    model, trainer, history, start_epoch = run.start(resume)
    full_size_train.fit_memory_of(model)
    curves = Curves(run.out, start_epoch, run.main)  # TensorBoard's files, when it is installed
    batches = _EpochBatches(cfg, train_set, anomaly_set, run.world)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        record = run.epoch(epoch, trainer, batches)
        evaluates = eval_set is not None and cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs)
        full_size_train.fit_statistics_of(model, evaluates or epoch == cfg.epochs, cfg.batch_size)
        if evaluates:
            t1 = time.perf_counter()
            # Sharded in whole batches of the single-process size: the same maps, the same metrics.
            record["eval"] = evaluate_model(model, eval_set, batch_size=cfg.batch_size, device=run.device,
                                            progress=False, distributed=run.world > 1)
            record["eval_seconds"] = round(time.perf_counter() - t1, 3)
        history.append(record)
        run.save(epoch, model, trainer, history, record)
        curves.add(record)
    curves.close()
    model.eval()
    return TrainResult(checkpoint=run.ckpt_path, log=run.log_path, history=history, model=model)


class _MemoryImages:
    """The training set's full-size images, one at a time on ``device``, with a progress bar:
    what the feature memory and the statistics of its maps are fitted on (a sequence, so that
    its size is known after the first)."""

    def __init__(self, cfg: TrainConfig, dataset, device, progress: bool):
        if cfg.model_config().memory_norm_cell and dataset is not None and len(dataset) < 2:
            raise ValueError("TrainConfig.memory_norm_cell needs at least two training images (the statistics of "
                             "their maps); set it to 0 to pick the feature memory's cells from the map as it is")
        self.dataset, self.device, self.progress = dataset, device, progress

    def __len__(self) -> int:
        return len(self.dataset)

    def fit_memory_of(self, model) -> None:
        """The model's feature memory, where it decides by one and has none yet. The backbone is
        frozen, so the memory is the same before the first epoch as after the last: fitted once,
        every evaluation and checkpoint of the run decides by it."""
        if model.config.memory_candidates and model.memory is None:
            model.fit_memory(self)

    def fit_statistics_of(self, model, now: bool, batch: int) -> None:
        """The statistics of the trained auto-encoder's maps (``memory_norm_cell``), fitted where
        they are used (``now``): for an evaluation and for the last checkpoint (an earlier one
        keeps the last fitted)."""
        if model.config.memory_norm_cell and now:
            model.fit_memory_normalization(self, batch=batch)

    def __iter__(self):
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self.dataset)), desc="feature memory", disable=not self.progress, leave=False,
                      dynamic_ncols=True):
            item = self.dataset[i]
            yield (item[0] if isinstance(item, (tuple, list)) else item).to(self.device)


def _tiles(cfg: TrainConfig, train_set, anomaly_set):
    """With tiling, the training and anomaly sets' tiles in place of their full-size images
    (pseudo-anomalies of the training set are redrawn from its tiles)."""
    tiling = tiling_of(cfg.tile_size, cfg.tile_stride)
    if tiling is None or train_set is None or len(train_set) == 0:
        return train_set, anomaly_set
    own_pseudo = isinstance(anomaly_set, PseudoAnomalyDataset) and anomaly_set.normal_dataset is train_set
    tiles = TileImages(train_set, tiling, cfg.image_size)
    if own_pseudo:
        anomaly_set = PseudoAnomalyDataset(tiles, alpha=anomaly_set.alpha, sigma=anomaly_set.sigma, seed=anomaly_set.seed)
    elif anomaly_set is not None and len(anomaly_set) and not isinstance(anomaly_set, PseudoAnomalyDataset):
        anomaly_set = TileImages(anomaly_set, tiling, cfg.image_size)
    return tiles, anomaly_set


# ------------------------------------------------------------------------------------------------
# Checks of the inputs
# ------------------------------------------------------------------------------------------------
def _check_inputs(cfg: TrainConfig, train_set, anomaly_set, eval_set, world: int) -> None:
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
    if cfg.protocol == "reference" and world > 1 and cfg.uses_anomalies and anomaly_set is not None:
        raise ValueError("TrainConfig.protocol 'reference' runs on one process: its short last anomaly batch "
                         f"cannot be split over {world} processes (use protocol 'ours' under torchrun)")
    own_pseudo = isinstance(anomaly_set, PseudoAnomalyDataset) and anomaly_set.normal_dataset is train_set
    if cfg.uses_anomalies and anomaly_set is not None and len(anomaly_set) < world and not own_pseudo:
        raise ValueError(f"anomaly_set has {len(anomaly_set)} images, fewer than the {world} processes: "
                         "each process needs at least one per step")
    if eval_set is not None:
        labels = getattr(eval_set, "labels", None)
        if labels is not None and len(set(int(v) for v in labels)) < 2:
            raise ValueError("eval_set must hold both normal and anomalous images")
    mean = cfg.normalization()[0]
    _check_dataset(train_set, "train_set", cfg, mean)
    if cfg.tile_size is None:  # a tiled model scores each test image whole, at its own size
        _check_dataset(eval_set, "eval_set", cfg, mean)
    if cfg.uses_anomalies and anomaly_set is not None and not isinstance(anomaly_set, PseudoAnomalyDataset):
        _check_dataset(anomaly_set, "anomaly_set", cfg, mean)


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
                      f"{tuple(model_mean)}: build the data set with the backbone's mean/std", stacklevel=4)


# ------------------------------------------------------------------------------------------------
# The batches of an epoch
# ------------------------------------------------------------------------------------------------
class _EpochBatches:
    """The (normal, anomalous or None) batches of each epoch, by the protocol the data asks for:
    every normal batch paired with its own elastic distortion (no anomaly set, or pseudo-anomalies
    of the training set), or a separate, cycling loader of the coarse anomaly set."""

    def __init__(self, cfg: TrainConfig, train_set, anomaly_set, world: int):
        self.cfg, self.world = cfg, world
        self.pseudo = self.anomalies = self.paired = None
        if cfg.uses_anomalies:
            if anomaly_set is None:
                self.pseudo = PseudoAnomalyDataset(train_set, alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma,
                                                   seed=cfg.seed)
            elif isinstance(anomaly_set, PseudoAnomalyDataset) and anomaly_set.normal_dataset is train_set:
                self.pseudo = anomaly_set
            else:
                self.anomalies = Images(anomaly_set)
            if self.pseudo is not None:
                self.paired = WithDistortion(self.pseudo)
        self.images = Images(train_set)

    def loader(self, epoch: int):
        """The epoch's loader of normal (or paired) batches, and an iterator of anomalous ones."""
        cfg, world = self.cfg, self.world
        if self.pseudo is not None:
            self.pseudo.set_epoch(epoch)
        source = self.paired if self.paired is not None else self.images
        loader = epoch_loader(source, cfg.batch_size, cfg, epoch, 0, drop_last=True, world=world)
        anomaly_iter = None
        if self.anomalies is not None:
            # Global anomaly batch, a multiple of the number of processes.
            a_batch = min(cfg.batch_size, len(self.anomalies)) // world * world
            if cfg.protocol == "reference":
                # The authors': the last short batch kept, one shuffle replayed all epoch.
                anomaly_iter = itertools.cycle(epoch_loader(self.anomalies, a_batch, cfg, epoch, 1,
                                                            drop_last=False, world=world))
            else:
                anomaly_iter = cycle(epoch_loader(self.anomalies, a_batch, cfg, epoch, 1, drop_last=True,
                                                  world=world))
        return loader, anomaly_iter

    def split(self, batch, anomaly_iter):
        if self.paired is not None:
            return batch
        return batch, (next(anomaly_iter) if anomaly_iter is not None else None)


# ------------------------------------------------------------------------------------------------
# One run's files, state and epochs
# ------------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, cfg: TrainConfig, out: Path, device, world: int, main: bool, progress: bool):
        self.cfg, self.out, self.device, self.world, self.main, self.progress = cfg, out, device, world, main, progress
        self.ckpt_path, self.log_path = out / CHECKPOINT_NAME, out / LOG_NAME

    def check_files(self, resume: bool, overwrite: bool) -> None:
        if resume and not self.ckpt_path.is_file():
            raise FileNotFoundError(f"cannot resume: {str(self.ckpt_path)!r} does not exist (run without --resume first)")
        if not resume and self.ckpt_path.exists() and not overwrite:
            raise FileExistsError(f"{str(self.out)!r} already holds a checkpoint: continue it (--resume; resume=True in "
                                  "Python), choose another --out, or start afresh (--overwrite; overwrite=True)")

    def _load(self) -> dict:
        ckpt = load_checkpoint(self.ckpt_path)
        if not ckpt.get("train_config") or "rng" not in ckpt or "optimizers" not in ckpt:
            raise ValueError(f"{str(self.ckpt_path)!r} holds no training state to resume "
                             "(it was not written by train())")
        saved = TrainConfig.from_dict(ckpt["train_config"])
        diff = differences(saved.to_dict(), self.cfg.to_dict(), RUN_FIELDS)
        if diff:
            detail = ", ".join(f"{k}: checkpoint {getattr(saved, k)!r} vs {getattr(self.cfg, k)!r}" for k in diff)
            raise ValueError(f"cannot resume {str(self.ckpt_path)!r} with a different configuration ({detail})")
        return ckpt

    def start(self, resume: bool) -> tuple[CKAAD, Trainer, list[dict], int]:
        """The model, its trainer, the history and the last finished epoch: fresh, or from the checkpoint."""
        cfg, device = self.cfg, self.device
        ckpt = None
        if resume:
            # Rank 0 reads the checkpoint and hands it to the others: out_dir need not be shared.
            ckpt = ddp.run_on_main(self._load)
            model = ckaad_from_checkpoint(ckpt, map_location=device)
        else:
            seed_everything(cfg.seed)
            model = CKAAD(cfg.model_config(), weights=cfg.weights).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        # Each rank's own copy of the configuration names its own device (cuda:LOCAL_RANK).
        own_cfg = cfg if self.world == 1 else dataclasses.replace(cfg, device=str(device))
        trainer = Trainer(model, own_cfg, distributed=self.world > 1)
        history: list[dict] = []
        start_epoch = 0
        if ckpt is not None:
            start_epoch = int(ckpt["epoch"])
            history = list(ckpt.get("history", []))
            trainer.load_state_dict(ckpt)
            set_rng_state(ckpt["rng"])
        if self.main:
            atomic_write_lines(self.log_path, history)  # a resumed run's log matches its checkpoint
        return model, trainer, history, start_epoch

    def epoch(self, epoch: int, trainer: Trainer, batches: _EpochBatches) -> dict[str, Any]:
        """Train one epoch; its log record (losses averaged over the steps and the ranks)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        t0 = time.perf_counter()
        trainer.model.train()
        loader, anomaly_iter = batches.loader(epoch)
        sums = torch.zeros(3, device=self.device)
        steps = 0
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not (self.progress and self.main), leave=False, dynamic_ncols=True)
        for batch in bar:
            sums += trainer.step(*batches.split(batch, anomaly_iter))
            steps += 1
            if self.progress and (steps % 10 == 1 or steps == len(loader)):
                d, g, r = (sums / steps).tolist()
                post = {"G": f"{g:.4f}", "rec": f"{r:.4f}"}
                bar.set_postfix({"D": f"{d:.4f}", **post} if trainer.discriminator is not None else post)
        bar.close()
        # The mean over ranks of the per-rank mean losses: the single-process value.
        d, g, r = (ddp.all_reduce_mean(sums) / max(steps, 1)).tolist()
        if not all(math.isfinite(v) for v in (d, g, r)):
            raise RuntimeError(f"non-finite loss in epoch {epoch} (D {d}, G {g}, recon {r}); the checkpoint of "
                               f"epoch {epoch - 1} is kept. Try lower learning rates or amp=None")
        return {
            "epoch": epoch,
            "d_loss": d if trainer.discriminator is not None else None,
            "g_loss": g,
            "recon_loss": r,
            # The discriminator's mean scores on this rank's last batch (None without one).
            "energy": trainer.energies(),
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def save(self, epoch: int, model: CKAAD, trainer: Trainer, history: list[dict], record: dict) -> None:
        """The checkpoint and the log line of a finished epoch (rank 0), then its progress line."""
        if self.main:
            save_checkpoint(self.ckpt_path, model, train_config=self.cfg.to_dict(), epoch=epoch, history=history,
                            rng=rng_state(), **trainer.state_dict())
            append_line(self.log_path, record)
        ddp.barrier()
        if self.progress and self.main:
            from tqdm.auto import tqdm

            d, g, r = record["d_loss"], record["g_loss"], record["recon_loss"]
            msg = f"epoch {epoch}/{self.cfg.epochs}: " + ("" if d is None else f"D {d:.4f}  ") + \
                f"G {g:.4f}  recon {r:.4f}  ({record['seconds']:.1f}s)"
            if "eval" in record:
                msg += "  " + "  ".join(f"{k} {v:.4f}" for k, v in record["eval"].items() if isinstance(v, float))
            tqdm.write(msg)
