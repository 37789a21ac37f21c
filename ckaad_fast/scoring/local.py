"""The work of :func:`~.runner.score_to_folder` in one process: a whole run, or one rank's share
of a sharded one (see :mod:`.sharded`).

:class:`LocalRun` streams the images through a :class:`~.engine.Scorer` (or anything that
scores paths as it does: :class:`~.deployed.DeployedScorer`), writes the maps on a
few threads, and rewrites scores.csv atomically every few seconds and at the end, so an
interruption loses nothing finished. A row enters the results only once its map is on disk.
"""
from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..atomic import atomic_save_npy
from ..errors import error_text
from ..faults import maybe_die_for_test
from .result import ScoreResult
from ..regions import draw_boxes, find_regions, regions_from_text, regions_to_text
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
    part_name,
    read_scale,
    row_done,
    unlink_parts,
    write_regions,
    write_rows,
    write_scale,
)

if TYPE_CHECKING:
    from .engine import Scorer

__all__ = ["LocalRun"]


class LocalRun:
    """The work of :func:`~.runner.score_to_folder` in one process.

    ``part=(rank, world)``: score ``paths`` (this rank's share of what is left to do) into
    ``OUT/parts/<part_name>``, naming the maps after ``all_paths`` (the whole input); the caller
    then decides what an earlier run left (see :mod:`.sharded`) and calls :meth:`score` directly.
    """

    def __init__(self, scorer: Scorer, paths: list[str], out: Path, maps: str, verdict: Verdict,
                 map_range: tuple[float, float] | None, flush_seconds: float,
                 on_batch: Callable[[], None] | None, part: tuple[int, int] | None = None,
                 all_paths: list[str] | None = None, masks: bool = False):
        self.scorer, self.paths, self.out, self.maps, self.verdict = scorer, paths, out, maps, verdict
        # Binary masks (map >= the calibrated pixel threshold) as OUT/masks/<name>.png.
        self.masks = masks
        self.masks_dir = out / MASKS_DIR
        self.mask_names = map_names(all_paths if all_paths is not None else paths, ".png") if masks else {}
        self.writes = maps != "none" or masks  # files written per image, beside its row
        self.need_maps = self.writes or verdict.regions
        self.map_range, self.flush_seconds, self.user_on_batch = map_range, flush_seconds, on_batch
        self.csv_path = out / PARTS_DIR / part_name(*part) if part is not None else out / CSV_NAME
        self.maps_dir = out / MAPS_DIR
        self.names = map_names(all_paths if all_paths is not None else paths, "." + maps) if maps != "none" else {}
        self.keys = keys_of(paths)  # what rows of an earlier run are matched by
        self.old: dict[str, dict] = {}  # the earlier run's rows, by key
        self.extra_old: list[dict] = []  # rows of images not in this input: kept, results are never dropped
        self.new: dict[str, dict] = {}
        self.done: set[str] = set()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.futures: list[tuple[concurrent.futures.Future, dict]] = []
        self.held: list[tuple[ScoreResult, dict]] = []  # PNG maps waiting for the colour scale
        self.batches = 0
        self.summary = ScoreSummary(csv_path=self.csv_path)
        # A whole run's promise monitor (a sharded run's is rank 0's, at the merge: .sharded).
        self.monitor = monitor_for(verdict, len(paths)) if part is None else None
        self.part = part

    # -- before scoring -----------------------------------------------------------------------
    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Read what an earlier run left in OUT (with ``resume``), or refuse to overwrite it, and
        record this run's manifest. Call it while holding OUT's lock."""
        self.old, self.extra_old, parts = begin_run(self.out, manifest_of(self.scorer, self.verdict.regions), self.keys,
                                                    resume, overwrite)
        if parts and not resume:
            unlink_parts(self.out)  # overwrite: stale rows of an earlier run must not come back on a resume
            parts = []
        if self.maps == "png" and self.map_range is None and resume:
            self.map_range = read_scale(self.maps_dir)
        self.done = done_paths(self.keys, self.old, self.maps, self.names, self.maps_dir)
        if self.masks:
            self.done &= done_paths(self.keys, self.old, "png", self.mask_names, self.masks_dir)
        self.summary.skipped = len(self.done)
        if parts:
            # Fold an interrupted sharded run's parts into scores.csv, then drop them.
            self.flush()
            unlink_parts(self.out)

    def flush(self) -> None:
        """Rewrite the results file with every row known now, in input order."""
        rows = [self.new.get(p) or kept_row(self.old, p, self.keys[p]) for p in self.paths]
        write_rows(self.csv_path, [r for r in rows if r is not None] + self.extra_old, self.verdict)

    # -- scoring ------------------------------------------------------------------------------
    def score(self, progress: bool) -> ScoreSummary:
        todo = [p for p in self.paths if p not in self.done]
        self.out.mkdir(parents=True, exist_ok=True)
        if self.writes:
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        if self.maps == "png" and self.map_range is not None:
            write_scale(self.maps_dir, self.map_range)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="img", desc="scoring", dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            if todo:
                self._stream(todo, bar)
        finally:
            self._finish_maps()
            if bar is not None:
                bar.close()
            self.summary.seconds = time.perf_counter() - t0
            self.flush()
        self._count_anomalous()
        self.summary.map_range = self.map_range if self.maps == "png" else None
        if self.part is None and (self.monitor is not None or self.verdict.regions):
            rows = [r for p in self.paths if (r := self.new.get(p) or kept_row(self.old, p, self.keys[p])) is not None]
            if self.monitor is not None:
                self.summary.monitor = self.monitor.finish(*decided(rows, self.verdict))
                record_in_manifest(self.out, "monitor", self.summary.monitor)
            if self.verdict.regions:
                write_regions(self.out, rows, self.verdict)
        return self.summary

    def _stream(self, todo: list[str], bar) -> None:
        last_flush = time.perf_counter()
        stream = self.scorer.score_paths(todo, return_maps=self.need_maps, return_images=self.maps == "png",
                                         on_batch=self._on_batch)
        for r in stream:
            self._take(r)
            if bar is not None:
                bar.update(1)
                if self.summary.failed:
                    bar.set_postfix(errors=self.summary.failed, refresh=False)
            now = time.perf_counter()
            if now - last_flush >= self.flush_seconds:
                self._settle(block=False)
                self.flush()
                last_flush = now

    def _take(self, r: ScoreResult) -> None:
        """One result: its row now, or once its map is on disk."""
        row = {"path": r.path, "score": "" if r.score is None else format(r.score, ".9g"), "error": r.error or ""}
        if not r.ok:
            self.summary.failed += 1
            self.summary.errors.append((r.path, r.error))
            self.new[r.path] = row
            return
        self.summary.scored += 1
        if self.verdict.regions:
            row["regions"] = regions_to_text(find_regions(r.map, self.verdict.calibration.pixel_threshold))
        if self.monitor is not None:
            self.monitor.add(self.verdict.anomalous(r.score))
        if self.pool is None:
            self.new[r.path] = row
            return
        if self.maps == "png" and self.map_range is None:
            self.held.append((r, row))
            if len(self.held) >= self.scorer.batch_size:
                self._fix_scale_and_release()
        else:
            self._submit(r, row)
        if len(self.futures) > 4 * self.scorer.batch_size:
            concurrent.futures.wait([self.futures[0][0]])
            self._settle(block=False)

    def _on_batch(self) -> None:
        self.batches += 1
        if self.user_on_batch is not None:
            self.user_on_batch()
        # Test-only fault injection (a no-op unless its variable is set): die after a periodic save.
        maybe_die_for_test(self.batches, self._save_now)

    def _save_now(self) -> None:
        self._settle(block=True)
        self.flush()

    # -- maps ---------------------------------------------------------------------------------
    def _write_map(self, path: str, r: ScoreResult, rng, regions: str = "") -> None:
        # A calibrated model's maps are written normalised (0.5 at its pixel threshold), like its scores.
        cal = self.verdict.calibration
        amap = cal.normalize_map(r.map) if cal is not None and self.maps != "none" else r.map
        if self.maps == "npy":
            atomic_save_npy(self.maps_dir / self.names[path], amap)
        elif self.maps == "png":
            from ..report import overlay, save_png

            picture = overlay(r.image, amap, rng[0], rng[1])
            if self.verdict.regions:  # the row's regions, as boxes on the picture a person looks at
                picture = draw_boxes(picture, regions_from_text(regions))
            save_png(picture, self.maps_dir / self.names[path])
        if self.masks:
            from ..report import save_png

            mask = (r.map >= self.verdict.calibration.pixel_threshold).astype(np.uint8) * 255
            save_png(mask, self.masks_dir / self.mask_names[path])

    def _submit(self, r: ScoreResult, row: dict) -> None:
        self.futures.append((self.pool.submit(self._write_map, r.path, r, self.map_range, row.get("regions", "")), row))

    def _fix_scale_and_release(self) -> None:
        # The colour scale of a run without map_range: the range of its first batch's maps.
        if self.map_range is None:
            lo = float(min(r.map.min() for r, _ in self.held))
            hi = float(max(r.map.max() for r, _ in self.held))
            self.map_range = (lo, hi if hi > lo else lo + 1e-6)
            write_scale(self.maps_dir, self.map_range)
        for r, row in self.held:
            self._submit(r, row)
        self.held.clear()

    def _settle(self, block: bool) -> None:
        """Rows enter the results once their map is on disk; a failed write is reported in the row."""
        keep = []
        for fut, row in self.futures:
            if not (block or fut.done()):
                keep.append((fut, row))
                continue
            err = fut.exception()
            if err is not None:
                row["error"] = f"map not written: {error_text(err)}"
                row["score"] = ""
                self.summary.scored -= 1
                self.summary.failed += 1
                self.summary.errors.append((row["path"], row["error"]))
            self.new[row["path"]] = row
        self.futures = keep

    def _finish_maps(self) -> None:
        if self.pool is None:
            return
        try:
            if self.held:
                self._fix_scale_and_release()
        finally:
            self._settle(block=True)
            self.pool.shutdown(wait=True)

    def _count_anomalous(self) -> None:
        if not self.verdict.decides:
            return
        scores = [float(r["score"]) for r in self.new.values() if row_done(r)]
        scores += [float(self.old[self.keys[p]]["score"]) for p in self.done]
        self.summary.anomalous = sum(1 for v in scores if self.verdict.anomalous(v))
