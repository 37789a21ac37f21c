"""Running a whole experiment, resumable run by run, into one folder::

    OUT/experiment.json      what the experiment is (a resumed one must match it)
    OUT/results.jsonl        one line per finished run (metrics, the per-defect-type breakdown)
    OUT/results.csv          the same, one row per run, flat
    OUT/by_defect_type.csv   one row per (run, defect type)
    OUT/table.md             the table in the paper's format (and the per-defect-type table)
    OUT/figure2.png          class-labelled data with k > 1: the paper's Figure 2 for this k (.figures)
    OUT/runs/<run_id>/       each run's checkpoint.pt and log.jsonl

A run is finished once its record is in ``results.jsonl`` (appended in one synced write; see
:mod:`.ledger` for what a crash or a stray edit there does) and is never made again; an
unfinished run continues from its last checkpoint. The CSVs and the table are rewritten
atomically after every run, so they always hold every finished run. One experiment at a time
works in a folder: a second one on the same ``OUT`` refuses, naming the first (its lock,
``OUT/.ckaad-fast.lock``, as ``ckaad-fast score``'s).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text
from ..data import FolderDataset, list_categories, open_dataset
from ..errors import ArgumentError
from ..lock import FolderLock
from ..report import save_png
from .figures import figure2
from .ledger import append_record, read_ledger, set_aside
from .plan import Experiment, RunSpec
from .single import run_one
from .tables import by_defect_rows, markdown, result_rows, write_csv
from ..records import as_stored, differences

__all__ = ["plan_experiment", "run_experiment", "read_results", "write_outputs"]

EXPERIMENT_NAME = "experiment.json"
RESULTS_NAME = "results.jsonl"


def plan_experiment(exp: Experiment) -> list[RunSpec]:
    """The runs of ``exp`` on its data set: reads the anomaly classes (class-labelled data) or
    the categories (industrial data) the plan needs."""
    if exp.class_labelled:
        category = exp.categories[0] if exp.categories else None
        train_set = open_dataset(exp.layout, exp.root, "train", 32, None, None, category=category,
                                 normal_class=exp.normal_class)
        if not isinstance(train_set, FolderDataset):  # open_dataset's class-labelled layouts all are
            raise ArgumentError("layout", f"layout {exp.layout!r} is not class-labelled")
        classes = tuple(c for c in sorted(train_set.paths_by_class)
                        if c != train_set.normal_class and train_set.paths_by_class[c])
        return exp.plan(anomaly_classes=classes)
    found = list_categories(exp.layout, exp.root)
    if exp.categories:
        missing = [c for c in exp.categories if c not in found]
        if missing:
            raise ArgumentError("categories", f"{missing} not in {exp.root!r}; found {found}")
        found = list(exp.categories)
    return exp.plan(categories=tuple(found))


def read_results(out_dir: str | Path, warn: bool = False) -> list[dict]:
    """The finished runs' records (a damaged line is skipped; with ``warn``, reported naming the
    file and the line: see :mod:`.ledger`)."""
    return read_ledger(Path(out_dir) / RESULTS_NAME, warn=warn).records


def _check_folder(exp: Experiment, out: Path, create: bool = True) -> None:
    """``out`` is new, or holds this experiment (the same data, protocol and settings)."""
    meta = out / EXPERIMENT_NAME
    if meta.is_file():
        try:
            saved = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArgumentError("out", f"{str(meta)!r} cannot be read ({type(e).__name__}: {e}): choose another "
                                       "folder, or remove it to start this experiment there afresh") from None
        if not isinstance(saved, dict):
            raise ArgumentError("out", f"{str(meta)!r} is not an experiment's description: choose another folder")
        now = as_stored(exp.describe())
        diff = differences(saved, now)
        if diff:
            detail = "; ".join(f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in diff)
            raise ArgumentError("out", f"{str(out)!r} holds another experiment ({detail}): choose another folder")
    elif create:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta, exp.describe())


def write_outputs(exp: Experiment, rows: list[dict], out_dir: str | Path) -> None:
    """results.csv, by_defect_type.csv, table.md and (class-labelled data, k > 1) figure2.png from
    the finished runs' rows."""
    out = Path(out_dir)
    write_csv(out / "results.csv", result_rows(rows))
    write_csv(out / "by_defect_type.csv", by_defect_rows(rows))
    atomic_write_text(out / "table.md", markdown(exp, rows))
    if exp.class_labelled and exp.num_classes > 1:
        picture = figure2([(exp, rows)])
        if picture is not None:
            save_png(picture, out / "figure2.png")


def run_experiment(exp: Experiment, out_dir: str | os.PathLike, *, progress: bool = True,
                   dry_run: bool = False) -> list[dict]:
    """Make every run of ``exp`` not yet finished in ``out_dir`` (see the module), then return
    all the finished runs' rows. ``dry_run``: make nothing, return the planned runs as rows
    ``{"run_id", "done"}``."""
    out = Path(out_dir)
    runs = plan_experiment(exp)
    _check_folder(exp, out, create=not dry_run)
    if dry_run:
        done = {r["run_id"] for r in read_results(out, warn=True)} if (out / EXPERIMENT_NAME).is_file() else set()
        return [{"run_id": r.run_id, "done": r.run_id in done} for r in runs]
    with FolderLock(out, what="ckaad-fast experiment"):  # one experiment per folder at a time
        # Read under the lock, once: what another experiment finished before it let go counts.
        ledger = read_ledger(out / RESULTS_NAME)
        set_aside(ledger)  # damaged lines (just reported) out of the way, kept in results.jsonl.damaged
        done = {r["run_id"] for r in ledger.records}
        return _run_todo(exp, out, runs, [r for r in runs if r.run_id not in done], ledger.records, progress)


def _run_todo(exp: Experiment, out: Path, runs: list[RunSpec], todo: list[RunSpec], records: list[dict],
              progress: bool) -> list[dict]:
    """Make the runs of ``todo``, appending each record to the ledger and to ``records`` (the
    ledger's, read under the lock this runs in), and write the tables after each."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"{exp.table} runs", unit="run",
               disable=not progress, dynamic_ncols=True)
    datasets: dict = {}  # each split indexed once for all the runs
    try:
        for spec in todo:
            bar.set_postfix_str(spec.run_id, refresh=True)
            row = run_one(exp, spec, out / "runs" / spec.run_id, progress=progress, datasets=datasets)
            append_record(out / RESULTS_NAME, row)
            records.append(json.loads(json.dumps(row)))  # as the ledger holds it
            write_outputs(exp, _planned(records, runs), out)
            bar.update(1)
    finally:
        bar.close()
    rows = _planned(records, runs)
    write_outputs(exp, rows, out)
    if progress:
        print(f"{len(rows)} runs in {out / 'table.md'}", file=sys.stderr)
    return rows


def _planned(rows: list[dict], runs: list[RunSpec]) -> list[dict]:
    """The rows of the planned runs, in plan order (a run of an earlier, larger plan is kept
    in results.jsonl but left out of this table)."""
    by_id = {r["run_id"]: r for r in rows}
    return [by_id[r.run_id] for r in runs if r.run_id in by_id]
