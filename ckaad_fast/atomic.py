"""Atomic file writes: every results file, picture and checkpoint goes through here, so that a
crash or Ctrl-C never leaves a half-written file and the previous version survives until the new
one is complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = False, **kwargs):
    """Open a temporary file in ``path``'s folder; when the block ends without an error, rename it
    onto ``path`` (atomic on POSIX), else delete it. ``fsync=True`` also forces the data to disk
    before the rename, for files that must survive a power cut (results CSVs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8", newline="") as f:
        f.write(text)
