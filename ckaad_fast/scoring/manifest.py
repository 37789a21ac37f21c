"""The run manifest beside scores.csv: what made the results, so that a resume never mixes models.

``OUT/run.json`` records the model's fingerprint (SHA-256 of its configuration and weights), the
options that change a score (top-k, image size, blur sigma and border, the compute dtype, the
engine that ran the forward), the
calibration's precision, the
tool's version and the folder relative paths were given from. ``--resume`` compares it with the
run about to start and refuses on any difference that changes scores; relative paths of the
earlier run are resolved against its folder, so rows match whichever way a path is spelt.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..atomic import atomic_write_json
from ..errors import ArgumentError
from ..records import differences

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "manifest_of", "read_manifest", "write_manifest", "check_resume",
           "path_key"]

MANIFEST_NAME = "run.json"
MANIFEST_FORMAT = "ckaad_fast.scores"
# What makes two runs' scores comparable: a resume refuses when one of these differs (the
# precision too: bfloat16 moves scores, so one scores.csv never mixes two precisions).
_SAME_SCORES = ("model_sha256", "topk", "image_size", "sigma", "border", "dtype", "engine", "regions")


def manifest_of(scorer, regions: bool = False) -> dict:
    """The manifest of a run by ``scorer`` (a :class:`~.engine.Scorer`), started from this folder."""
    c = scorer.config
    return {
        "format": MANIFEST_FORMAT,
        # 2: the fingerprint covers what scores (backbone, auto-encoder, configuration), not
        # training's discriminator; version 1 fingerprinted the whole training checkpoint.
        "version": 2,
        "tool": f"ckaad_fast {__version__}",
        "model_sha256": scorer.fingerprint(),
        "backbone": c.backbone,
        "layers": list(c.layers),
        "image_size": list(scorer.image_size),
        "topk": scorer.topk,
        "sigma": c.sigma,
        "border": c.border,
        "dtype": scorer.precision,
        # Who ran the forward: another engine's float32 scores differ in the last digits.
        "engine": scorer.engine,
        "calibration_precision": (None if scorer.calibration is None
                                  else scorer.calibration.precision or "float32"),
        "calibration_device": None if scorer.calibration is None else scorer.calibration.device,
        # Whether rows hold the regions at the calibration's pixel threshold.
        "regions": bool(regions),
        "cwd": os.getcwd(),
    }


def read_manifest(out: Path) -> dict | None:
    """The manifest of the earlier run in ``out``, or None (none written; a resume of rows
    without one is refused: see :func:`~.results.begin_run`)."""
    try:
        data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ArgumentError("resume", f"{str(out / MANIFEST_NAME)!r} cannot be read ({e}): use --overwrite "
                                      "to score everything again") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ArgumentError("resume", f"{str(out / MANIFEST_NAME)!r} is not a ckaad_fast run manifest")
    return data


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_json(out / MANIFEST_NAME, manifest, fsync=True)


def record_in_manifest(out: Path, key: str, value) -> None:
    """Add ``key`` to the run.json of ``out`` (what a finished run found: the promise monitor's
    test), keeping everything else it records."""
    manifest = read_manifest(out)
    if manifest is not None:
        write_manifest(out, {**manifest, key: value})


def check_resume(saved: dict | None, current: dict, out: Path) -> None:
    """Refuse to resume results made by another model or with options that change the scores."""
    if saved is None:
        return
    # Results written before engines were recorded were the torch engine's.
    # Nor regions, before rows held them.
    saved, current = {"engine": "torch", "regions": False, **saved}, {"engine": "torch", "regions": False, **current}
    diff = differences(saved, current, _SAME_SCORES)
    if diff == ["model_sha256"] and saved.get("version") == 1:
        raise ArgumentError(
            "resume",
            f"the results in {str(out)!r} were written by an earlier ckaad_fast whose model fingerprint also covered "
            "the training-only discriminator, so this one cannot tell whether the checkpoint is the same: use "
            "--overwrite to score everything again (or another --out)")
    if diff:
        detail = "; ".join(f"{k} {_show(k, saved.get(k))} there, {_show(k, current.get(k))} now" for k in diff)
        raise ArgumentError(
            "resume",
            f"the results in {str(out)!r} were made by another model or with other options ({detail}): resume "
            "with the same checkpoint and options, use another --out, or --overwrite to score everything again",
        )


def _show(key: str, value) -> str:
    return value[:12] if key == "model_sha256" and isinstance(value, str) else repr(value)


def path_key(path: str, base: str | None = None) -> str:
    """The key rows are matched by on a resume: the real, absolute path (a relative one taken
    from ``base``, the run's folder; symbolic links resolved), so that ``a.png``, ``./a.png``,
    ``/data/a.png`` and the same file reached through a linked folder are one image."""
    return os.path.realpath(os.path.join(base or os.getcwd(), path))


def keys_of(paths: Sequence[str], base: str | None = None) -> dict[str, str]:
    return {p: path_key(p, base) for p in paths}
