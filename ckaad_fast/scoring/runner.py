"""Scoring a list of images into a results folder, the job of ``ckaad-fast score``:
:func:`score_to_folder` decides whether one process (:mod:`.local`) or every rank of a process
group (:mod:`.sharded`) does the work."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..decisions import DEFAULT_SENSITIVITY
from .local import LocalRun
from ..lock import FolderLock
from ..errors import ArgumentError
from .manifest import MANIFEST_NAME, manifest_of, read_manifest, write_manifest
from .results import ScoreSummary, Verdict, check_arguments, check_out, previous_rows

if TYPE_CHECKING:
    from .engine import Scorer

__all__ = ["score_to_folder", "adopt_results"]


def adopt_results(scorer: Scorer, out_dir) -> int:
    """Declare that the rows in ``out_dir`` that no ``run.json`` describes (written by a
    ckaad_fast older than the manifest, or a folder copied without it) were made by ``scorer``'s
    model and options, so that a resume keeps them: writes the manifest of a run by ``scorer``
    with an ``adopted`` entry saying so. Returns the number of rows adopted. Refused, naming
    ``adopt_rows``, for a folder whose manifest already says what made it (a resume checks that
    one) or that holds no rows. A resume without a manifest and without this declaration is
    refused: nothing else could tell two models' rows apart."""
    out = Path(out_dir)
    with FolderLock(out):
        if read_manifest(out) is not None:
            raise ArgumentError("adopt_rows", f"{str(out / MANIFEST_NAME)!r} already says what made these results: "
                                              "--resume alone checks it against this run")
        rows = previous_rows(out)
        if not rows:
            raise ArgumentError("adopt_rows", f"{str(out)!r} holds no results to adopt")
        manifest = manifest_of(scorer)
        manifest["adopted"] = {"rows": len(rows), "note": "rows found without a manifest, declared by the user to be "
                                                          "this model's with these options"}
        write_manifest(out, manifest)
    return len(rows)


def score_to_folder(
    scorer: Scorer,
    paths: Sequence,
    out_dir,
    maps: str = "none",
    threshold: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    map_range: tuple[float, float] | None = None,
    progress: bool = True,
    flush_seconds: float = 2.0,
    on_batch: Callable[[], None] | None = None,
    distributed: bool | None = None,
    sensitivity: float | None = None,
    masks: bool = False,
    regions: bool | None = None,
) -> ScoreSummary:
    """Score ``paths`` and write ``out_dir/scores.csv`` (and the maps), the job of ``ckaad-fast score``.

    scores.csv has one row per image, in input order, with the columns ``path``, ``score``,
    ``error`` (empty when the image was scored) and, with ``threshold``, ``is_anomalous``
    (True when score >= threshold). When the scorer's model is calibrated
    (:mod:`ckaad_fast.calibration`), rows also get ``normalized_score`` and, without a
    ``threshold``, ``is_anomalous`` by the calibration at ``sensitivity`` (None: 0.5,
    :data:`~ckaad_fast.head.DEFAULT_SENSITIVITY`, the calibrated threshold; higher flags more).
    ``masks=True`` writes each image's binary mask (map >= the pixel threshold) as
    ``out_dir/masks/<name>.png``. ``regions`` (None: where the calibration has a pixel threshold,
    on a GPU only where maps are written) adds each image's defect regions (:mod:`ckaad_fast.regions`)
    to the rows (``regions``), ``out_dir/regions.json`` and the PNG overlays (boxes). A calibrated
    model's maps are written normalised (0.5 at the pixel threshold), PNG overlays on the range
    0..1 unless ``map_range`` is given. It is rewritten atomically (temporary file, fsync, rename)
    every ``flush_seconds`` and at the end, also on an interruption or an error, so that it is
    never half-written and holds every result computed before the stop.

    ``maps``: "none", "npy" (the float32 map, ``out_dir/maps/<name>.npy``) or "png" (a heat-map
    overlay on the image the model saw, ``out_dir/maps/<name>.png``; Turbo colours, one range for
    every image: ``map_range``, else the one of an earlier run in ``maps/colour_scale.json``,
    else the minimum and maximum of the first batch's maps; the range used is saved in
    ``maps/colour_scale.json``). See :func:`~.results.map_names` for ``<name>``. Map files are
    written atomically too, before the row that reports them.

    ``resume``: keep the rows of an existing scores.csv that were scored (and whose map file
    exists when maps are asked for) and score the rest; rows with an error are retried. Rows an
    interrupted sharded run left in ``out_dir/parts/`` count too (they are folded into scores.csv
    and the part files removed). Without ``resume`` an existing scores.csv (or parts) raises
    FileExistsError unless ``overwrite`` (which removes stale parts).

    ``distributed`` (None: when a process group of more than one process runs, e.g. under
    torchrun; call it on every rank with the same arguments): the images still to score are
    split into contiguous shards of whole batches, one per rank (so that every batch is one a
    single process runs, and the results are the same bit for bit); each rank writes its rows to
    ``out_dir/parts/scores.rank{r}-of-{n}.csv`` (atomically, as above) and its maps straight into
    ``out_dir/maps/``; then rank 0 merges the parts into ``out_dir/scores.csv`` in input order
    (the same file a single process writes) and removes them. When a rank dies, the rows its
    part holds and those of the other ranks' finished parts are kept by ``resume``, with any
    number of processes. Rank 0 fixes the PNG colour range (from the first batch, as a single
    process does) before the others start. Every rank returns the summary of the whole run.
    ``out_dir`` must be one folder seen by every rank (a shared file system across machines).

    One run at a time writes to ``out_dir``: a second one raises FileExistsError naming the first
    (see :mod:`ckaad_fast.lock`). ``out_dir/run.json`` records what made the results (see :mod:`.manifest`):
    ``resume`` refuses results of another model or other scoring options. A score that is not a
    finite number is an error row, never a verdict.
    """
    check_arguments(maps, threshold, map_range, sensitivity)
    verdict, map_range = _decision(scorer, threshold, sensitivity, masks, maps, map_range, regions)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no images to score")
    out = Path(out_dir)
    check_out(out, resume, overwrite)
    if distributed is not False and _in_process_group():  # None: whenever a process group runs
        from .sharded import score_sharded  # torch's; imported only where a process group runs
        return score_sharded(scorer, paths, out, maps, verdict, resume, overwrite, map_range, progress,
                             flush_seconds, on_batch, masks)
    run = LocalRun(scorer, paths, out, maps, verdict, map_range, flush_seconds, on_batch, masks=masks)
    with FolderLock(out):  # one writer per results folder
        run.prepare(resume, overwrite)
        return run.score(progress)


def _in_process_group() -> bool:
    """Whether a process group of more than one process runs (torchrun). One exists only where
    torch.distributed was imported, so a process without torch (the deployment path) never asks."""
    if "torch.distributed" not in sys.modules:
        return False
    from .. import distributed as ddp

    return ddp.is_distributed()


def _decision(scorer: Scorer, threshold, sensitivity, masks: bool, maps: str, map_range, regions=None):
    """The run's Verdict, and the PNG colour range (0..1 for a calibrated model's normalised maps)."""
    pixel = getattr(scorer.calibration, "pixel_threshold", None) is not None
    for asked, what in ((masks, "masks"), (regions, "regions")):
        if asked and not pixel:
            raise ValueError(f"{what} need a checkpoint calibrated with a pixel threshold: run ckaad-fast calibrate "
                             "(by F1 on a set with ground-truth masks, else at a false-positive rate of the normal "
                             "images' pixels)")
    if regions is None:  # on a GPU only where the maps come back anyway: reading them all back costs throughput
        regions = pixel and (scorer.device.type == "cpu" or masks or maps != "none")
    regions = bool(regions)
    sensitivity = DEFAULT_SENSITIVITY if sensitivity is None else sensitivity
    if scorer.calibration is not None and maps == "png" and map_range is None:
        map_range = (0.0, 1.0)  # normalised maps: one scale for every run, the threshold in its middle
    if map_range is not None:
        map_range = tuple(float(v) for v in map_range)
    return Verdict(threshold, scorer.calibration, float(sensitivity), regions), map_range
