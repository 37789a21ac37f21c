"""Atomic file writes: every results file, picture and checkpoint goes through here, so that a
crash or Ctrl-C never leaves a half-written file and the previous version survives until the new
one is complete. This is the library's one way of writing a file: nothing else renames temporary
files."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """For writers that take a file name, not a file (a profiler's trace export): yields a
    temporary path in ``path``'s folder, renamed onto ``path`` when the block ends without an
    error (and the writer wrote it), else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = False, **kwargs):
    """Open a temporary file in ``path``'s folder; when the block ends without an error, rename it
    onto ``path`` (atomic on POSIX), else delete it. ``fsync=True`` also forces the data to disk
    before the rename, for files that must survive a power cut (results CSVs)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8", newline="") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = False) -> None:
    """Write ``obj`` as indented JSON, with a final newline, to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n", fsync=fsync)


def atomic_write_lines(path: str | os.PathLike, records, fsync: bool = False) -> None:
    """Write one JSON line per record (a JSON Lines log) to ``path`` atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records), fsync=fsync)


def append_line(path: str | os.PathLike, record) -> None:
    """Append ``record`` as one JSON line in one write, flushed and synced: a crash leaves whole
    lines behind (the log of a run grows this way; see :func:`atomic_write_lines` to rewrite it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save atomically: a crash never leaves a half-written checkpoint, and the previous one
    survives until the new one is complete."""
    import torch  # here: the rest of this module is plain Python

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_save_npy(path: str | os.PathLike, arr) -> None:
    """Save ``arr`` as a float32 .npy file atomically."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.save(f, np.asarray(arr, dtype=np.float32))
