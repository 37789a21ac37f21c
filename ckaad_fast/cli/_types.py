"""Argument types shared by the subcommands: a bad value is reported by argparse with the
option's name and exit code 2."""
from __future__ import annotations

import argparse


def int_at_least(lo: int):
    """An argparse type for integers >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def _float(text: str, ok, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")) or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def finite_float(text: str) -> float:
    return _float(text, lambda v: True, "a finite number")


def positive_float(text: str) -> float:
    return _float(text, lambda v: v > 0, "a number > 0")


def nonneg_float(text: str) -> float:
    return _float(text, lambda v: v >= 0, "a number >= 0")


def unit_float(text: str) -> float:
    return _float(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def ratio_float(text: str) -> float:
    return _float(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a rate, a share)."""
    return _float(text, lambda v: 0 < v < 1, "a number in (0, 1)")


def fraction_or_zero(text: str) -> float:
    """A number in [0, 1) (a bound on a loss that may be zero)."""
    return _float(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def precision(text: str) -> str:
    """A precision name of :mod:`ckaad_fast.precision` (aliases fp32, bf16, fp16 accepted)."""
    from ..errors import ArgumentError
    from ..precision import canonical_precision

    try:
        return canonical_precision(text)
    except ArgumentError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def precision_or_int8(text: str) -> str:
    """A precision name, or int8 (for calibrate, score and export, which can honour it)."""
    from ..errors import ArgumentError
    from ..precision import canonical_precision

    try:
        return canonical_precision(text, int8=True)
    except ArgumentError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def add_tiling_arguments(p: argparse.ArgumentParser, sets: bool) -> None:
    """``--tile-size`` and ``--tile-stride``: ``sets=True`` (train, experiment) chooses the
    tiling; otherwise (eval, calibrate, score, export) the checkpoint's tiling is followed and
    the options, when given, must restate it (see :func:`ckaad_fast.model.check_recorded_tiling`)."""
    g = p.add_argument_group("tiling (high-resolution images)")
    follow = "" if sets else " The checkpoint records the tiling and this command follows it; given, it must match."
    g.add_argument("--tile-size", type=positive_int, default=None, metavar="PX",
                   help="cut square tiles of PX pixels from each image at its own resolution and score each at "
                        "the model's input size, stitching their maps at full resolution (default: no tiling, "
                        "the whole image is resized)." + follow)
    g.add_argument("--tile-stride", type=positive_int, default=None, metavar="PX",
                   help="pixels between two tiles' starts, at most --tile-size (default: 3/4 of the tile size, "
                        "so that neighbours overlap and the blend hides seams)." + follow)
    if sets:
        g.add_argument("--memory-candidates", type=nonneg_int, default=None, metavar="K",
                       help="a tiled model's image decision: keep the training images' features and score an "
                            "image by the largest distance to them among the K highest cells of its map "
                            "(default: 500; 0: the mean of the map's top-k values instead, which export needs)")
        g.add_argument("--memory-norm-cell", type=nonneg_int, default=None, metavar="PX",
                       help="with the feature memory, pick its cells from the map normalised per position by the "
                            "training images' own maps, in cells of PX pixels: for aligned objects (16 lifted a "
                            "plate's image AUROC from 59-75 to 74-90); textures do better without (the default)")


def given(**options) -> dict:
    """The options given on the command line (not None): every other one takes the Python API's
    default, which the CLI never restates."""
    return {name: value for name, value in options.items() if value is not None}
