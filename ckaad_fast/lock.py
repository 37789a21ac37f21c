"""One writer per output folder (a results folder, an experiment's): a lock file that names its holder.

Two ``ckaad-fast score`` runs on the same ``--out`` would overwrite each other's scores.csv and
both report success. :class:`FolderLock` makes the second refuse, naming the first (its process
id, host and start time). A lock whose process is gone (killed, crashed; the same host, so that
its liveness can be checked) is taken over, so a crash never blocks the next run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderLock"]

LOCK_NAME = ".ckaad-fast.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class FolderLock:
    """``with FolderLock(out):`` holds ``out/.ckaad-fast.lock`` for the block (creating ``out``).

    Raises FileExistsError naming the holder when a live process holds it.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "ckaad-fast score"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half written by a holder that is starting: treat as held

    def _stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if holder and self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # its process is gone: take the lock over
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
                       if holder else "a process that is starting")
                raise FileExistsError(
                    f"{str(self.folder)!r} is in use by another {holder.get('what', self.what) if holder else self.what} "
                    f"({who}): wait for it to finish or use another --out; if that process is gone, "
                    f"remove {str(self.path)!r}"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self._held = True
            return
        raise FileExistsError(f"could not take the lock {str(self.path)!r}: it keeps changing hands")

    def release(self) -> None:
        if self._held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self._held = False

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
