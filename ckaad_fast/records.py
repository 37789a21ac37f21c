"""Does this folder hold the same thing? The one comparison of a folder's JSON record (what made
it) with what would be made now: the engine's results folder (run.json), an experiment's folder,
a training run's checkpoint configuration and the generated data sets (meta.json) all ask it.
Beside it, :class:`PlainConfig`: how a configuration record round-trips through plain types."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping

__all__ = ["read_record", "as_stored", "differences", "holds", "PlainConfig"]


def read_record(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``; None where there is none (missing, unreadable, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def as_stored(record: Mapping) -> dict:
    """``record`` as it reads back from JSON (tuples as lists, keys as strings): what a saved one is
    compared with."""
    return json.loads(json.dumps(record))


def differences(saved: Mapping, current: Mapping, keys: Iterable | None = None) -> list[str]:
    """The keys (``keys``, else every key of ``current``) whose values differ between a saved record
    and the current one, both compared as JSON stores them."""
    saved, current = as_stored(saved), as_stored(current)
    return [k for k in (current if keys is None else keys) if saved.get(k) != current.get(k)]


def holds(path: str | os.PathLike, current: Mapping) -> bool:
    """Whether the record at ``path`` is ``current``, exactly (no key more or less)."""
    saved = read_record(path)
    return saved is not None and saved == as_stored(current)


class PlainConfig:
    """Round-trips a configuration dataclass through plain types (lists for tuples), which JSON
    and ``torch.load(weights_only=True)`` both accept."""

    _kind = "configuration"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls._kind} keys {sorted(unknown)}")
        return cls(**d)
