"""The results folder of a scoring run: ``OUT/scores.csv``, ``OUT/maps/`` and, while a sharded
run is under way, ``OUT/parts/``; how an earlier run's rows are read back for ``--resume``.

scores.csv has one row per image, in input order, with the columns ``path``, ``score``,
``error`` (empty when the image was scored) and, with a threshold, ``is_anomalous``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_write_text

__all__ = ["CSV_NAME", "MAPS_DIR", "SCALE_NAME", "MAP_FORMATS", "PARTS_DIR", "ScoreSummary", "part_name",
           "part_files", "read_scores_csv", "row_done", "map_names", "previous_rows", "unlink_parts",
           "exists_error", "check_arguments", "write_rows", "earlier_run", "done_paths", "read_scale", "write_scale"]

CSV_NAME = "scores.csv"
MAPS_DIR = "maps"
SCALE_NAME = "colour_scale.json"
MAP_FORMATS = ("none", "npy", "png")
#: Where the ranks of a sharded (torchrun) run put their rows: OUT/parts/scores.rank{r}-of-{n}.csv.
PARTS_DIR = "parts"


def part_name(rank: int, world: int) -> str:
    """The file name of rank ``rank``'s rows in a run of ``world`` processes."""
    return f"scores.rank{rank}-of-{world}.csv"


def part_files(out: Path) -> list[Path]:
    """The part files a sharded run has left in ``out/parts/``, sorted."""
    d = out / PARTS_DIR
    return sorted(d.glob("scores.rank*-of-*.csv")) if d.is_dir() else []


@dataclass
class ScoreSummary:
    """What :func:`score_to_folder` did: counts, time and where the results are."""

    csv_path: Path
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    anomalous: int | None = None
    seconds: float = 0.0
    map_range: tuple[float, float] | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else float("nan")



def read_scores_csv(path) -> list[dict]:
    """The rows of a scores.csv (dicts of strings; ``score`` is "" for rows with an error).
    A file that is not a scores.csv raises ValueError."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if not {"path", "score", "error"} <= set(fields):
            raise ValueError(f"{str(path)!r} is not a scores.csv (columns {fields}, expected path, score, error)")
        return list(reader)


def row_done(row: dict) -> bool:
    """Whether a row holds a finite score and no error (a row to keep on a resume)."""
    if row.get("error"):
        return False
    try:
        return math.isfinite(float(row.get("score", "")))
    except ValueError:
        return False


def map_names(paths: Sequence[str], ext: str) -> dict[str, str]:
    """Map file names (relative to OUT/maps) for ``paths``: each image's path relative to the
    deepest folder holding all of them, with its extension replaced by ``ext`` (".npy" or
    ".png"); where two images would share a name (a.png and a.jpg), the original extension is
    kept in front (a.png.npy, a.jpg.npy)."""
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    rel = [os.path.relpath(a, root) for a in absolute]
    stems = [os.path.splitext(r)[0] for r in rel]
    counts: dict[str, int] = {}
    for st in stems:
        counts[st] = counts.get(st, 0) + 1
    return {p: (st if counts[st] == 1 else r) + ext for p, r, st in zip(paths, rel, stems)}


def previous_rows(out: Path) -> list[dict]:
    """The rows of an earlier run: OUT/scores.csv and the parts an interrupted sharded run left
    in OUT/parts/, one row per path (a scored row wins over a row with an error, a later file
    over an earlier one), in the order first seen."""
    files = ([out / CSV_NAME] if (out / CSV_NAME).exists() else []) + part_files(out)
    best: dict[str, dict] = {}
    for f in files:
        for r in read_scores_csv(f):
            p = r["path"]
            if p not in best or row_done(r) or not row_done(best[p]):
                best[p] = r
    return list(best.values())


def unlink_parts(out: Path) -> None:
    """Remove ``out/parts/`` with everything a sharded run left in it."""
    d = out / PARTS_DIR
    # The parts, and the temporary files of a rank killed while it wrote its part.
    for f in part_files(out) + (sorted(d.glob(".scores.rank*-of-*.csv.*.tmp")) if d.is_dir() else []):
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / PARTS_DIR).rmdir()


def finish_row(r: dict, threshold: float | None) -> dict:
    """The row as written: its three columns, and ``is_anomalous`` under a threshold."""
    r = {"path": r["path"], "score": r.get("score", ""), "error": r.get("error", "")}
    if threshold is not None:
        try:
            r["is_anomalous"] = str(float(r["score"]) >= threshold) if r["score"] != "" else ""
        except ValueError:
            r["is_anomalous"] = ""
    return r


def exists_error(csv_path: Path, parts: list[Path]) -> FileExistsError:
    """The error of a run that would overwrite an earlier run's results."""
    what = repr(str(csv_path)) if csv_path.exists() else \
        f"{str(csv_path.parent / PARTS_DIR)!r} (the partial results of an interrupted run)"
    return FileExistsError(
        f"{what} already exists: pass --resume to score only what is missing, "
        "or --overwrite to score everything again"
    )


def csv_text(rows: Sequence[dict], with_threshold: bool) -> str:
    """The text of a scores.csv holding ``rows``."""
    cols = ["path", "score", "error"] + (["is_anomalous"] if with_threshold else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()



def check_arguments(maps, threshold, map_range) -> None:
    """ValueError for a bad ``maps`` format, threshold or colour range."""
    if maps not in MAP_FORMATS:
        raise ValueError(f"maps must be one of {MAP_FORMATS}, got {maps!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if map_range is not None:
        lo, hi = (float(v) for v in map_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"map_range must be two finite numbers LO < HI, got {map_range!r}")



def write_rows(csv_path: Path, rows: Sequence[dict], threshold: float | None) -> None:
    """Rewrite ``csv_path`` with ``rows`` atomically and durably (temporary file, fsync, rename)."""
    text = csv_text([finish_row(r, threshold) for r in rows], threshold is not None)
    atomic_write_text(csv_path, text, fsync=True)


def earlier_run(out: Path, paths: Sequence[str], resume: bool, overwrite: bool) -> tuple[dict, list, list[Path]]:
    """What an earlier run left in ``out``: its rows by path (with ``resume``; a scored row wins
    over a row with an error), its rows of images not in ``paths`` (kept: results are never
    dropped), and the part files of an interrupted sharded run. Without ``resume`` an earlier
    run's results raise FileExistsError unless ``overwrite``. Creates ``out``."""
    csv_path = out / CSV_NAME
    parts = part_files(out)
    old_rows: list[dict] = []
    if csv_path.exists() or parts:
        if resume:
            old_rows = previous_rows(out)
        elif not overwrite:
            raise exists_error(csv_path, parts)
    out.mkdir(parents=True, exist_ok=True)
    in_input = set(paths)
    return {r["path"]: r for r in old_rows}, [r for r in old_rows if r["path"] not in in_input], parts


def done_paths(paths: Sequence[str], old: dict[str, dict], maps: str, names: dict[str, str], maps_dir: Path) -> set:
    """The paths an earlier run finished: scored, and with their map file on disk when maps are asked for."""
    return {
        p for p in paths
        if p in old and row_done(old[p]) and (maps == "none" or (maps_dir / names[p]).is_file())
    }


def read_scale(maps_dir: Path) -> tuple[float, float] | None:
    """The PNG colour range an earlier run saved in ``maps_dir``, or None."""
    try:
        saved = json.loads((maps_dir / SCALE_NAME).read_text())
        return float(saved["lo"]), float(saved["hi"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_scale(maps_dir: Path, map_range: tuple[float, float]) -> None:
    """Save the PNG colour range of a run in ``maps_dir`` (so that a resume uses the same)."""
    text = json.dumps({"colormap": "turbo", "lo": map_range[0], "hi": map_range[1]}) + "\n"
    atomic_write_text(maps_dir / SCALE_NAME, text, fsync=True)
