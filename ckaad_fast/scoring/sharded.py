"""Scoring sharded over the ranks of a process group (``torchrun``): the same results file as one
process writes, bit for bit, merged by rank 0 (see :func:`~.runner.score_to_folder`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import distributed as ddp
from .engine import Scorer
from ..lock import FolderLock
from .manifest import keys_of, manifest_of, record_in_manifest
from .monitor import decided, monitor_for
from .results import (
    CSV_NAME,
    MAPS_DIR,
    MASKS_DIR,
    PARTS_DIR,
    ScoreSummary,
    Verdict,
    begin_run,
    done_paths,
    kept_row,
    map_names,
    part_files,
    part_name,
    read_scale,
    read_scores_csv,
    row_done,
    unlink_parts,
    write_regions,
    write_rows,
)
from .local import LocalRun

__all__ = ["score_sharded"]


def score_sharded(scorer: Scorer, paths: list[str], out: Path, maps: str, verdict: Verdict, resume: bool,
                  overwrite: bool, map_range: tuple[float, float] | None, progress: bool, flush_seconds: float,
                  on_batch: Callable[[], None] | None, masks: bool = False) -> ScoreSummary:
    """:func:`~.runner.score_to_folder` on every rank of a process group."""
    rank, world = ddp.rank(), ddp.world_size()
    t0 = time.perf_counter()
    names = map_names(paths, "." + maps) if maps != "none" else {}
    earlier = _Earlier(paths, out, maps, names, verdict, scorer)
    try:
        summary = _run(scorer, earlier, rank, world, maps, resume, overwrite, map_range, progress, flush_seconds,
                       on_batch, masks)
    finally:
        earlier.lock.release()  # held by rank 0 only; a no-op elsewhere
    summary.seconds = time.perf_counter() - t0
    return summary


def _run(scorer, earlier, rank, world, maps, resume, overwrite, map_range, progress, flush_seconds, on_batch,
         masks):
    paths, out, verdict = earlier.paths, earlier.out, earlier.verdict
    todo, skipped, map_range = ddp.run_on_main(lambda: earlier.prepare(resume, overwrite, map_range, masks))
    if maps == "png" and map_range is None and todo:
        # The colour range of the first batch's maps, as one process takes it, for every rank.
        map_range = ddp.run_on_main(lambda: _first_range(scorer, todo))

    # Whole batches of the single-process order per rank: the same batches, the same results.
    mine = ddp.shard(todo, rank, world, block=scorer.batch_size)
    if mine:
        local = LocalRun(scorer, mine, out, maps, verdict, map_range, flush_seconds, on_batch, part=(rank, world),
                         all_paths=paths, masks=masks).score(progress and rank == 0)
    else:
        local = ScoreSummary(csv_path=out / PARTS_DIR / part_name(rank, world))
    ddp.barrier()
    stats = ddp.gather_object((local.scored, local.failed, local.errors))
    return ddp.run_on_main(lambda: earlier.merge(stats, skipped, map_range if maps == "png" else None))


class _Earlier:
    """Rank 0's view of the results folder: what an earlier run left, and the final merge."""

    def __init__(self, paths: list[str], out: Path, maps: str, names: dict[str, str], verdict: Verdict,
                 scorer: Scorer):
        self.paths, self.out, self.maps, self.names, self.verdict = paths, out, maps, names, verdict
        self.scorer = scorer
        self.csv_path = out / CSV_NAME
        self.keys = keys_of(paths)
        self.lock = FolderLock(out)
        self.old: dict[str, dict] = {}
        self.extra: list[dict] = []

    def _kept(self) -> list[dict]:
        rows = [kept_row(self.old, p, self.keys[p]) for p in self.paths]
        return [r for r in rows if r is not None]

    def prepare(self, resume: bool, overwrite: bool, map_range, masks: bool = False):
        """(paths still to score, how many were done, the PNG colour range): rank 0's answer,
        taken while holding OUT's lock, which rank 0 keeps until the merge is done."""
        self.lock.acquire()
        manifest = manifest_of(self.scorer, self.verdict.regions)
        self.old, self.extra, parts = begin_run(self.out, manifest, self.keys, resume, overwrite)
        if parts or (overwrite and not resume and self.csv_path.exists()):
            # One scores.csv with what is kept (nothing, with overwrite), and no parts: the parts
            # this run writes are then all new, and a crash leaves nothing stale behind.
            write_rows(self.csv_path, self._kept() + self.extra, self.verdict)
            unlink_parts(self.out)
        if self.maps == "png" and map_range is None and resume:
            map_range = read_scale(self.out / MAPS_DIR)
        done = done_paths(self.keys, self.old, self.maps, self.names, self.out / MAPS_DIR)
        if masks:
            done &= done_paths(self.keys, self.old, "png", map_names(self.paths, ".png"), self.out / MASKS_DIR)
        return [p for p in self.paths if p not in done], len(done), map_range

    def merge(self, stats, skipped: int, map_range) -> ScoreSummary:
        """Fold every rank's part into scores.csv, in input order; the summary of the whole run."""
        new: dict[str, dict] = {}
        for f in part_files(self.out):
            for r in read_scores_csv(f):
                new[r["path"]] = r
        rows = [new.get(p) or kept_row(self.old, p, self.keys[p]) for p in self.paths]
        rows = [r for r in rows if r is not None]
        write_rows(self.csv_path, rows + self.extra, self.verdict)
        unlink_parts(self.out)
        index = {p: i for i, p in enumerate(self.paths)}
        summary = ScoreSummary(
            csv_path=self.csv_path,
            scored=sum(s[0] for s in stats),
            failed=sum(s[1] for s in stats),
            skipped=skipped,
            errors=sorted((e for s in stats for e in s[2]), key=lambda e: index.get(e[0], len(index))),
            map_range=map_range,
        )
        if self.verdict.decides:
            summary.anomalous = sum(1 for r in rows if row_done(r) and self.verdict.anomalous(float(r["score"])))
        monitor = monitor_for(self.verdict, len(self.paths))
        if monitor is not None:  # the whole run, in input order: its windows too
            flags, scores = decided(rows, self.verdict)
            for flag in flags:
                monitor.add(flag)
            summary.monitor = monitor.finish(flags, scores)
            record_in_manifest(self.out, "monitor", summary.monitor)
        if self.verdict.regions:
            write_regions(self.out, rows, self.verdict)
        return summary


def _first_range(scorer: Scorer, todo: list[str]) -> tuple[float, float] | None:
    seen: list[np.ndarray] = []
    stream = scorer.score_paths(todo, return_maps=True)
    try:
        for r in stream:
            if r.ok:
                seen.append(r.map)
                if len(seen) >= scorer.batch_size:
                    break
    finally:
        stream.close()
    if not seen:
        return None
    lo = float(min(m.min() for m in seen))
    hi = float(max(m.max() for m in seen))
    return (lo, hi if hi > lo else lo + 1e-6)
