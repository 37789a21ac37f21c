"""The experiment's ledger, ``OUT/results.jsonl``: one JSON object per finished run, that a crash,
a full disk or a stray edit can damage but never turn into a lost or a wrong result.

- Appending writes one whole record (a JSON line, flushed and synced). When the file does not end
  with a newline (a crash or a full disk cut the last write short), the torn line is closed
  first, so the new record is never glued onto it.
- Reading keeps every line that is a run's record (a JSON object with a ``run_id``) and reports
  each other line, naming the file and the line: torn or foreign JSON, bytes that are not UTF-8.
  A run whose record was damaged is simply not finished, so the experiment makes it again.
- :func:`set_aside` (what the experiment does, holding its folder's lock) rewrites the ledger
  atomically with its records only and keeps the damaged lines, byte for byte, in
  ``<ledger>.damaged``: reported once, never lost, never in the way again.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Ledger", "LedgerProblem", "read_ledger", "append_record", "set_aside"]


@dataclass
class LedgerProblem:
    """One line of the ledger that is no run's record: its number (1-based) and why."""

    line: int
    reason: str
    raw: bytes = b""


@dataclass
class Ledger:
    """The records read from a ledger and the lines skipped."""

    path: Path
    records: list[dict] = field(default_factory=list)
    problems: list[LedgerProblem] = field(default_factory=list)

    def report(self) -> str:
        """One line naming the file and each skipped line."""
        what = "; ".join(f"line {p.line}: {p.reason}" for p in self.problems)
        return (f"{str(self.path)!r}: {len(self.problems)} line(s) skipped ({what}); "
                "their runs are not finished and are made again")


def _record(raw: bytes, n: int) -> tuple[dict | None, LedgerProblem | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, LedgerProblem(n, f"not UTF-8 (byte {e.start})", raw)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None, LedgerProblem(n, "not a whole JSON record (torn by a crash mid-write?)", raw)
    if not isinstance(value, dict) or not isinstance(value.get("run_id"), str):
        return None, LedgerProblem(n, f"not a run's record (a {type(value).__name__} without a run_id)", raw)
    return value, None


def read_ledger(path: str | os.PathLike, warn: bool = True) -> Ledger:
    """The records of the ledger at ``path`` (none when it does not exist); each damaged line is
    skipped and, with ``warn``, reported in one warning naming the file and the lines."""
    ledger = Ledger(Path(path))
    try:
        data = ledger.path.read_bytes()
    except FileNotFoundError:
        return ledger
    except OSError as e:
        raise OSError(e.errno, f"cannot read the experiment's ledger {str(ledger.path)!r}: {e.strerror}") from None
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        record, problem = _record(raw, n)
        if record is not None:
            ledger.records.append(record)
        else:
            ledger.problems.append(problem)
    if warn and ledger.problems:
        warnings.warn(ledger.report(), RuntimeWarning, stacklevel=2)
    return ledger


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line (:func:`ckaad_fast.atomic.append_line`: a torn last line
    stays on its own, reported and skipped)."""
    from ..atomic import append_line

    append_line(path, record)


def set_aside(ledger: Ledger) -> Path | None:
    """Move the damaged lines of ``ledger`` (read just before, by the one writer) to
    ``<ledger>.damaged`` (appended) and rewrite the ledger with its records only, atomically.
    Returns the file the lines went to, or None when there were none."""
    from ..atomic import atomic_write_lines

    if not ledger.problems:
        return None
    aside = ledger.path.with_name(ledger.path.name + ".damaged")
    with open(aside, "ab") as f:
        f.write(b"".join(p.raw + b"\n" for p in ledger.problems))
        f.flush()
        os.fsync(f.fileno())
    atomic_write_lines(ledger.path, ledger.records)
    return aside
