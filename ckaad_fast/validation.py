"""The field checks ModelConfig and TrainConfig share: each error names the class and the field
(``TrainConfig.layers must ...``), which ``ckaad-fast`` turns into the option's name."""
from __future__ import annotations

import math
import numbers

__all__ = ["MAX_IMAGE_SIDE", "bad", "is_int", "is_number", "check_choice", "check_layers", "check_image_size", "check_topk"]


def bad(kind: str, name: str, must: str, value) -> ValueError:
    return ValueError(f"{kind}.{name} must {must}, got {value!r}")


def is_int(v) -> bool:
    """Python and NumPy integers, never bools: what a configuration field that is saved may hold
    (the ops take 0-d integer tensors too: ``ops.checks.is_index_like``)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
    """Finite Python and NumPy real numbers, never bools."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_choice(kind: str, name: str, value, choices) -> None:
    if value not in choices:
        raise bad(kind, name, f"be one of {tuple(choices)}", value)


def check_layers(kind: str, layers) -> tuple[int, ...]:
    """Backbone layers: a non-empty, strictly increasing sequence of ints in 1..4."""
    try:
        items = list(layers)
    except TypeError:
        raise bad(kind, "layers", "be a sequence of ints in 1..4", layers) from None
    if not all(is_int(v) for v in items):
        raise bad(kind, "layers", "be a sequence of ints in 1..4", layers)
    out = tuple(int(v) for v in items)
    if not out or any(not 1 <= v <= 4 for v in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise bad(kind, "layers", "be a non-empty, strictly increasing sequence of ints in 1..4", layers)
    return out


#: The largest image side a model takes: the ops' bound on an anomaly map's side
#: (``ops.scoring.MAX_OUT_SIDE``; a test keeps the two equal), checked before any work.
MAX_IMAGE_SIDE = 4096


def check_image_size(kind: str, image_size) -> tuple[int, int]:
    """An int or an (h, w) pair of ints in [16, MAX_IMAGE_SIDE], as (h, w)."""
    size = (image_size, image_size) if is_int(image_size) else image_size
    try:
        size = tuple(size)
    except TypeError:
        size = ()
    if len(size) != 2 or not all(is_int(v) and 16 <= v <= MAX_IMAGE_SIDE for v in size):
        raise bad(kind, "image_size", f"be an int or an (h, w) pair of ints in [16, {MAX_IMAGE_SIDE}]", image_size)
    return int(size[0]), int(size[1])


def check_topk(kind: str, topk, image_size: tuple[int, int]) -> None:
    """None (the map's mean) or an int in [1, h * w]."""
    n = image_size[0] * image_size[1]
    if topk is not None and (not is_int(topk) or not 1 <= topk <= n):
        raise bad(kind, "topk", f"be None or an int in [1, {n}] (the map's pixels)", topk)
