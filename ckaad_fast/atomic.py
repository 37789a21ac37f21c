"""Atomic file writes: every results file, picture and checkpoint goes through here, so that a
crash or Ctrl-C never leaves a half-written file and the previous version survives until the new
one is complete. This is the library's one way of writing a file: nothing else renames temporary
files.

Files are created with the permissions ``open()`` would give them under the process's umask
(0644 under umask 022), not the 0600 of a bare ``mkstemp``, so that results on a shared file
system stay readable by the others who share it. The temporary files are named
``.<name>.<random>.tmp`` beside their target; one that a killed process left behind is removed by
:func:`remove_stale_temporaries` when the next run starts.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()
#: A temporary file this old (seconds) is a killed write's, never one in progress.
STALE_AFTER_S = 3600.0


def _umask() -> int:
    # Linux says it without changing it; elsewhere set-and-restore, under a lock, since the map
    # writers create files on several threads.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None, recursive: bool = False,
                             older_than: float | None = None) -> list[Path]:
    """Remove the temporary files that interrupted writes of ``folder/name`` (of any file, when
    ``name`` is None; in sub-folders too with ``recursive``) left behind: a killed process never
    reaches its clean-up. Call it only where no other process writes there now (a run holding the
    folder's lock), or with ``older_than`` (seconds): only files last written longer ago than that
    go, where another process may be writing a younger one. Returns what it removed."""
    import time

    cutoff = None if older_than is None else time.time() - older_than
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # mkstemp's names: "." + the target's name + "." + 8 random characters + ".tmp".
    target = re.escape(name) if name is not None else r".+"
    pattern = re.compile(r"^\." + target + r"\.[A-Za-z0-9_]{8}\.tmp$")
    removed = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if pattern.match(p.name) and p.is_file() and not p.is_symlink():
            if cutoff is not None and p.stat().st_mtime > cutoff:
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """For writers that take a file name, not a file (a profiler's trace export): yields a
    temporary path in ``path``'s folder, renamed onto ``path`` when the block ends without an
    error (and the writer wrote it), else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it, not mkstemp's 0600
    finally:
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
    if fsync:
        # The rename itself is durable only once the folder's entry is on disk too.
        with contextlib.suppress(OSError):
            fd = os.open(Path(path).parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False, errors: str = "strict") -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically. ``errors="surrogateescape"``
    writes the raw bytes of file names that are not valid UTF-8 (as Python decodes them) back as
    they were."""
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8", errors=errors, newline="") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = False) -> None:
    """Write ``obj`` as indented JSON, with a final newline, to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n", fsync=fsync)


def atomic_write_lines(path: str | os.PathLike, records, fsync: bool = False) -> None:
    """Write one JSON line per record (a JSON Lines log) to ``path`` atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records), fsync=fsync)


def append_line(path: str | os.PathLike, record) -> None:
    """Append ``record`` as one JSON line in one write, flushed and synced, after closing a torn
    last line (a crash mid-write) so that it stays on a line of its own: a crash leaves whole
    lines behind (the JSON Lines logs grow this way, training's and the experiments' ledger; see
    :func:`atomic_write_lines` to rewrite one)."""
    line = json.dumps(record).encode("utf-8") + b"\n"
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save atomically: a crash never leaves a half-written checkpoint, and the previous one
    survives until the new one is complete."""
    import torch  # here: the rest of this module is plain Python

    # Temporaries of earlier writes of this file that a killed process left (an hour old: not a
    # write in progress), which would otherwise stay beside the checkpoint for good.
    remove_stale_temporaries(Path(path).parent, Path(path).name, older_than=STALE_AFTER_S)
    try:
        with atomic_open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        # torch's writer reports a full or failing disk as "enforce fail at inline_container.cc":
        # say what it is, an error writing this file.
        first = next((line for line in str(e).splitlines() if line.strip()), str(e))
        raise OSError(errno.EIO, f"could not write the checkpoint ({first.strip()[:200]})", os.fspath(path)) from None


def atomic_save_npy(path: str | os.PathLike, arr) -> None:
    """Save ``arr`` as a float32 .npy file atomically."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.save(f, np.asarray(arr, dtype=np.float32))
