"""An exported model in the results folder of ``ckaad-fast score``, without PyTorch.

:class:`DeployedScorer` gives a :class:`~ckaad_fast.deployment.Deployment` (a folder written by
``ckaad-fast export``, run by OpenVINO or ONNX Runtime) what the results folder asks of a
:class:`~.engine.Scorer`: its stream of :class:`~.result.ScoreResult`, its calibration (read from
the export's sidecar), and what the manifest records. So ``score --checkpoint EXPORT_DIR`` keeps
every guarantee ``score`` has (the atomic, resumable scores.csv, the lock, error rows, maps, masks,
regions, run.json, the promise monitor) in a process that never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

from ..calibration.thresholds import Calibration
from ..deployment import SIDECAR, Deployment
from .result import ScoreResult

__all__ = ["DeployedScorer", "is_export_folder"]


def is_export_folder(path) -> bool:
    """Whether ``path`` is a folder written by ``ckaad-fast export`` (it holds the sidecar)."""
    return Path(path).is_dir() and (Path(path) / SIDECAR).is_file()


@dataclass
class _Config:
    """The part of a model's configuration a manifest records, as the sidecar gives it."""

    backbone: str | None
    layers: tuple
    sigma: float | None
    border: str | None


class DeployedScorer:
    """The export in ``folder`` run by ``runtime`` (None: its format's own) with ``threads``
    threads, ``batch_size`` images (a tiled model: tiles) a call."""

    def __init__(self, folder, runtime: str | None = None, threads: int | None = None, batch_size: int = 16):
        self.deployment = Deployment(folder, runtime=runtime, threads=threads)
        side = self.deployment.sidecar
        self.batch_size = int(batch_size)
        self.device = SimpleNamespace(type="cpu")  # both runtimes run the graph on the CPU here
        self.calibration = Calibration.from_dict(side["calibration"]) if side.get("calibration") else None
        #: The sensitivity the export decides at (``export --sensitivity``): the run's default.
        self.sensitivity = self.deployment.sensitivity if self.calibration is not None else None
        self.config = _Config(side.get("backbone"), tuple(side.get("layers") or ()), side.get("sigma"),
                              side.get("border"))
        self.image_size = self.deployment.image_size
        # The top-k the graph (or a tiled model's stitched map) takes; an export older than the
        # sidecar's "topk" records a tiled model's only.
        self.topk = side.get("topk", self.deployment.topk)
        self.precision = side.get("dtype") or "float32"
        self.engine = self.deployment.runtime
        self.tiling = self.deployment.tiling

    def fingerprint(self) -> str:
        """The exported model's fingerprint (the checkpoint's, recorded by export)."""
        return self.deployment.sidecar["model_sha256"]

    def __repr__(self) -> str:
        c = self.config
        tiles = f", tiles={self.tiling.size}/{self.tiling.stride}" if self.tiling is not None else ""
        return (f"DeployedScorer(export={str(self.deployment.folder)!r}, backbone={c.backbone!r}, "
                f"image_size={self.image_size}, runtime={self.engine!r}, dtype={self.precision}, "
                f"batch_size={self.batch_size}, topk={self.topk}{tiles})")

    def score_paths(self, paths: Iterable, return_maps: bool = True, return_images: bool = False,
                    on_batch: Callable[[], None] | None = None) -> Iterator[ScoreResult]:
        """One :class:`~.result.ScoreResult` per file, in input order (the Scorer's contract):
        raw maps (the results folder normalises them and finds the regions itself)."""
        for r in self.deployment.score_paths(paths, batch_size=self.batch_size, return_maps=return_maps,
                                             regions=False, return_images=return_images, on_batch=on_batch):
            yield ScoreResult(r.path, r.score, r.map, r.error, r.image)
