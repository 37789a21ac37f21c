"""The results folder of a scoring run: ``OUT/scores.csv``, ``OUT/maps/`` and, while a sharded
run is under way, ``OUT/parts/``; how an earlier run's rows are read back for ``--resume``.

scores.csv has one row per image, in input order, with the columns ``path``, ``score``,
``error`` (empty when the image was scored) and, with a threshold, ``is_anomalous``.

Paths are written as given, with two exceptions that keep the file safe, valid UTF-8 and
lossless (:func:`read_scores_csv` undoes both):

- a path that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, a
  tab or a carriage return) or that starts with ``'`` is written with a ``'`` in front (OWASP's
  advice for CSV injection);
- a file name that is not valid UTF-8 (bytes from another encoding, which POSIX allows) is
  written as ``'%`` followed by the path's bytes percent-encoded (RFC 3986: every byte outside
  printable ASCII, and ``%`` itself, as ``%XX``), e.g. ``'%/data/caf%E9.png`` for the Latin-1
  name ``café.png``. No other cell starts with ``'%`` (a formula-escaped path starts with ``'``
  and one of ``=+-@'`` or a tab or CR), so the bytes come back exactly:
  ``urllib.parse.unquote_to_bytes(cell[2:])``.

Other cells (an error message quoting such a name) show its odd bytes as ``\\udcXX`` escapes.
The CSV is therefore always valid UTF-8, which common readers (pandas, spreadsheets) need.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write_text, remove_stale_temporaries
from ..errors import ArgumentError
from ..decisions import DEFAULT_SENSITIVITY, check_sensitivity
from .manifest import MANIFEST_NAME, check_resume, path_key, read_manifest, write_manifest

__all__ = ["CSV_NAME", "MAPS_DIR", "MASKS_DIR", "SCALE_NAME", "REGIONS_NAME", "write_regions", "MAP_FORMATS", "PARTS_DIR", "ScoreSummary", "part_name",
           "part_files", "read_scores_csv", "row_done", "map_names", "previous_rows", "unlink_parts",
           "exists_error", "check_arguments", "write_rows", "check_out", "earlier_run", "begin_run", "kept_row", "done_paths", "escape_cell",
           "unescape_cell", "CSV_ERRORS", "Verdict", "read_scale", "write_scale"]

CSV_NAME = "scores.csv"
MAPS_DIR = "maps"
#: Where ``--masks png`` puts each image's binary mask (map >= the calibrated pixel threshold).
MASKS_DIR = "masks"
SCALE_NAME = "colour_scale.json"
#: Every scored image's regions, written at the end of a run (its rows hold them too).
REGIONS_NAME = "regions.json"
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
    #: The promise monitor's record (:mod:`.monitor`), for a calibrated decision; also in run.json.
    monitor: dict | None = None

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else float("nan")



# Cells a spreadsheet would evaluate, and the quote that marks an escaped cell.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
# The mark of a path written as percent-encoded bytes (see the module's docstring).
_BYTES_MARK = "'%"
# Printable ASCII but "%": kept as they are in a percent-encoded path, so it stays readable.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
# Reading: older scores.csv files wrote undecodable names as their raw bytes; read them back so.
CSV_ERRORS = "surrogateescape"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes Python could not decode (os.fsdecode)
        return False
    return True


def escape_cell(text: str) -> str:
    """``text`` safe for a spreadsheet and for UTF-8: a formula-leading cell (or one starting with
    ``'``) gets a ``'``; a name that is not valid UTF-8 becomes ``'%`` + its bytes percent-encoded."""
    if not _is_utf8(text):
        return _BYTES_MARK + urllib.parse.quote_from_bytes(os.fsencode(text), safe=_SAFE)
    return "'" + text if text.startswith(_FORMULA_START) else text


def unescape_cell(text: str) -> str:
    """The inverse of :func:`escape_cell` (a path as Python's file functions take it)."""
    if text.startswith(_BYTES_MARK):
        return os.fsdecode(urllib.parse.unquote_to_bytes(text[len(_BYTES_MARK):]))
    return text[1:] if text.startswith("'") else text


def plain_cell(text: str) -> str:
    """Any other cell as valid UTF-8: undecodable bytes shown as ``\\udcXX``."""
    return text if _is_utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def read_scores_csv(path) -> list[dict]:
    """The rows of a scores.csv (dicts of strings; ``score`` is "" for rows with an error), each
    ``path`` as it was given to the run. A file that is not a scores.csv raises ValueError."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8", errors=CSV_ERRORS) as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if not {"path", "score", "error"} <= set(fields):
            raise ValueError(f"{str(path)!r} is not a scores.csv (columns {fields}, expected path, score, error)")
        rows = list(reader)
    for r in rows:
        r["path"] = unescape_cell(r["path"])
    return rows


def row_done(row: dict) -> bool:
    """Whether a row holds a finite score and no error (a row to keep on a resume)."""
    if row.get("error"):
        return False
    try:
        return math.isfinite(float(row.get("score", "")))
    except ValueError:
        return False


def map_names(paths: Sequence[str], ext: str) -> dict[str, str]:
    """Map file names (relative to OUT/maps) for ``paths``: each image's whole path relative to
    the deepest folder holding all of them, extension included, with ``ext`` (".npy" or ".png")
    added: ``a.png`` -> ``a.png.npy``. Two different images can never share a map name (``a.png``,
    ``a.jpg`` and ``a.png.png`` give ``a.png.npy``, ``a.jpg.npy`` and ``a.png.png.npy``)."""
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    return {p: os.path.relpath(a, root) + ext for p, a in zip(paths, absolute)}


def previous_rows(out: Path, base: str | None = None) -> dict[str, dict]:
    """The rows of an earlier run by :func:`~.manifest.path_key` (relative paths taken from
    ``base``, the earlier run's folder): OUT/scores.csv and the parts an interrupted sharded run
    left in OUT/parts/, one row per image (a scored row wins over a row with an error, a later
    file over an earlier one), in the order first seen."""
    files = ([out / CSV_NAME] if (out / CSV_NAME).exists() else []) + part_files(out)
    best: dict[str, dict] = {}
    for f in files:
        for r in read_scores_csv(f):
            k = path_key(r["path"], base)
            if k not in best or row_done(r) or not row_done(best[k]):
                best[k] = r
    return best


def unlink_parts(out: Path) -> None:
    """Remove ``out/parts/`` with everything a sharded run left in it."""
    d = out / PARTS_DIR
    # The parts, and the temporary files of a rank killed while it wrote its part.
    for f in part_files(out) + (sorted(d.glob(".scores.rank*-of-*.csv.*.tmp")) if d.is_dir() else []):
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / PARTS_DIR).rmdir()


@dataclass(frozen=True)
class Verdict:
    """How a row's decision is made: by a raw ``threshold`` (it wins when given), else by a
    :class:`~ckaad_fast.calibration.Calibration` at ``sensitivity`` (0.5: the calibrated
    threshold; higher flags more). With a calibration, rows also get ``normalized_score``."""

    threshold: float | None = None
    calibration: object | None = None
    sensitivity: float = DEFAULT_SENSITIVITY
    #: Whether rows get ``regions``: the map's regions at the calibration's pixel threshold
    #: (:mod:`ckaad_fast.regions`), as compact JSON.
    regions: bool = False

    @property
    def columns(self) -> list[str]:
        return (["path", "score"] + (["normalized_score"] if self.calibration is not None else []) + ["error"]
                + (["is_anomalous"] if self.decides else []) + (["regions"] if self.regions else []))

    @property
    def decides(self) -> bool:
        return self.threshold is not None or self.calibration is not None

    def anomalous(self, score: float) -> bool:
        if self.threshold is not None:
            return score >= self.threshold
        return score >= self.calibration.decision_threshold(self.sensitivity)


def finish_row(r: dict, verdict: Verdict) -> dict:
    """The row as written: its columns, ``normalized_score`` and ``is_anomalous`` from its score;
    an empty verdict where there is no finite score (a NaN is never 'not anomalous')."""
    out = {"path": r["path"], "score": r.get("score", ""), "error": r.get("error", "")}
    try:
        # The float32 score the model gave: its 9-digit text read back in float64 can lie a hair
        # below it, which would flip a score that sits exactly at a float32 threshold.
        score = float(np.float32(out["score"])) if out["score"] != "" else None
    except ValueError:
        score = None
    if score is not None and not math.isfinite(score):
        score = None
    if verdict.calibration is not None:
        out["normalized_score"] = "" if score is None else format(verdict.calibration.normalize(score), ".6g")
    if verdict.decides:
        out["is_anomalous"] = "" if score is None else str(verdict.anomalous(score))
    if verdict.regions:
        out["regions"] = r.get("regions", "") if score is not None else ""
    return out


def exists_error(csv_path: Path, parts: list[Path]) -> FileExistsError:
    """The error of a run that would overwrite an earlier run's results."""
    what = repr(str(csv_path)) if csv_path.exists() else \
        f"{str(csv_path.parent / PARTS_DIR)!r} (the partial results of an interrupted run)"
    return FileExistsError(
        f"{what} already exists: pass --resume to score only what is missing, "
        "or --overwrite to score everything again"
    )


def csv_text(rows: Sequence[dict], verdict: Verdict) -> str:
    """The text of a scores.csv holding ``rows``."""
    cols = verdict.columns
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (escape_cell(v) if k == "path" else plain_cell(v) if isinstance(v, str) else v)
                    for k, v in r.items()})
    return buf.getvalue()



def check_arguments(maps, threshold, map_range, sensitivity: float | None = None) -> None:
    """ValueError for a bad ``maps`` format, threshold, colour range or sensitivity (None: the default)."""
    check_sensitivity(DEFAULT_SENSITIVITY if sensitivity is None else sensitivity)
    if maps not in MAP_FORMATS:
        raise ValueError(f"maps must be one of {MAP_FORMATS}, got {maps!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if map_range is not None:
        lo, hi = (float(v) for v in map_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"map_range must be two finite numbers LO < HI, got {map_range!r}")



def write_rows(csv_path: Path, rows: Sequence[dict], verdict: Verdict) -> None:
    """Rewrite ``csv_path`` with ``rows`` atomically and durably (temporary file, fsync, rename)."""
    text = csv_text([finish_row(r, verdict) for r in rows], verdict)
    atomic_write_text(csv_path, text, fsync=True)  # strict: escape_cell and plain_cell leave only UTF-8


def check_out(out_dir, resume: bool, overwrite: bool) -> None:
    """Whether a run may write into ``out_dir``: a ValueError when it is a file, FileExistsError
    when it holds an earlier run's results and neither ``resume`` nor ``overwrite`` is given."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    parts = part_files(out)
    if ((out / CSV_NAME).exists() or parts) and not resume and not overwrite:
        raise exists_error(out / CSV_NAME, parts)


def earlier_run(out: Path, keys: dict[str, str], resume: bool, overwrite: bool,
                base: str | None = None) -> tuple[dict, list, list[Path]]:
    """What an earlier run left in ``out``: its rows by path key (with ``resume``; a scored row
    wins over a row with an error; relative paths taken from ``base``), its rows of images not
    in this run's ``keys`` (path -> key; kept: results are never dropped), and the part files of
    an interrupted sharded run. Without ``resume`` an earlier run's results raise
    FileExistsError unless ``overwrite``. Creates ``out``."""
    csv_path = out / CSV_NAME
    parts = part_files(out)
    old: dict[str, dict] = {}
    if csv_path.exists() or parts:
        if resume:
            old = previous_rows(out, base)
        elif not overwrite:
            raise exists_error(csv_path, parts)
    out.mkdir(parents=True, exist_ok=True)
    in_input = set(keys.values())
    return old, [r for k, r in old.items() if k not in in_input], parts


def begin_run(out: Path, manifest: dict, keys: dict[str, str], resume: bool,
              overwrite: bool) -> tuple[dict, list, list[Path]]:
    """Open ``out`` for a run described by ``manifest`` (see :mod:`.manifest`): refuse to resume
    results of another model or other options, read the earlier rows (:func:`earlier_run`),
    remove the temporary files a killed run left, and record this run's manifest. Call it while
    holding the folder's lock."""
    saved = read_manifest(out) if resume else None
    if resume and saved is None and ((out / CSV_NAME).is_file() or part_files(out)):
        # Rows without a manifest: nothing says which model or options made them, so a resume
        # could mix two models' rows in one file without a word.
        raise ArgumentError("resume", f"{str(out)!r} holds results but no {MANIFEST_NAME} saying what made them: "
                                      "use --overwrite to score everything again, or another --out; or, if you "
                                      "know they are this checkpoint's with these options, add --adopt-rows")
    check_resume(saved, manifest, out)
    if saved is not None and "adopted" in saved:  # the declaration stays with the rows it covers
        manifest = {**manifest, "adopted": saved["adopted"]}
    old, extra, parts = earlier_run(out, keys, resume, overwrite, base=saved.get("cwd") if saved else None)
    remove_stale_temporaries(out, recursive=True)
    write_manifest(out, manifest)
    return old, extra, parts


def kept_row(old: dict[str, dict], path: str, key: str) -> dict | None:
    """The earlier run's row of ``path`` (matched by ``key``), spelt as this run gives the path."""
    r = old.get(key)
    return None if r is None else {**r, "path": path}


def done_paths(keys: dict[str, str], old: dict[str, dict], maps: str, names: dict[str, str], maps_dir: Path) -> set:
    """The paths (of ``keys``: path -> key) an earlier run finished: scored, and with their map
    file on disk when maps are asked for."""
    return {
        p for p, k in keys.items()
        if k in old and row_done(old[k]) and (maps == "none" or (maps_dir / names[p]).is_file())
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


def write_regions(out: Path, rows: Sequence[dict], verdict: Verdict) -> None:
    """``out/regions.json`` (atomically): the pixel threshold and how it was picked, and each
    scored row's regions (:mod:`ckaad_fast.regions`), in the rows' order."""
    import json

    from ..atomic import atomic_write_json

    cal = verdict.calibration
    images = [{"path": r["path"], "regions": json.loads(r.get("regions") or "[]")} for r in rows if row_done(r)]
    atomic_write_json(out / REGIONS_NAME, {"pixel_threshold": cal.pixel_threshold, "pixel_method": cal.pixel_method,
                                           "pixel_fpr": cal.pixel_fpr, "images": images})
