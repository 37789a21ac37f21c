"""Input checks shared by every metric: numpy arrays or CPU torch tensors in, validated numpy out."""
from __future__ import annotations

import sys

import numpy as np

__all__ = ["to_numpy", "check_binary", "check_finite", "image_inputs", "pixel_inputs", "require_both_pixel_classes",
           "check_fpr_limit"]


def to_numpy(x, name: str) -> np.ndarray:
    # torch is looked up, not imported, so that the metrics work (and import fast) without it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - depends on the foreign object
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers or booleans, got dtype {arr.dtype}")
    return arr


def check_binary(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"{name} must be binary (0/1 or bool), found values such as {bad.tolist()}")
    return arr != 0


def check_finite(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; it holds NaN or infinite values")
    return arr


def image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = to_numpy(labels, "labels")
    s = to_numpy(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D of shape (N,), got labels.shape={y.shape} "
            f"and scores.shape={s.shape}"
        )
    if y.shape != s.shape:
        raise ValueError(
            f"labels and scores must have the same length, got labels.shape={y.shape} "
            f"and scores.shape={s.shape}"
        )
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    y = check_binary(y, "labels")
    s = check_finite(s, "scores")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"labels must contain both classes (0 and 1), got {n_pos} positives of {y.size}; "
            "the metric is undefined"
        )
    return y, s


def pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    m = to_numpy(masks, "masks")
    a = to_numpy(maps, "maps")
    # (N, 1, H, W) is what segmentation data loaders and models usually produce.
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(
            f"masks and maps must have shape (N, H, W), got masks.shape={m.shape} "
            f"and maps.shape={a.shape}"
        )
    if m.shape != a.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got masks.shape={m.shape} "
            f"and maps.shape={a.shape}"
        )
    if m.size == 0:
        raise ValueError(f"masks and maps are empty (shape {m.shape})")
    return check_binary(m, "masks"), check_finite(a, "maps")


def require_both_pixel_classes(m: np.ndarray) -> int:
    n_pos = int(np.count_nonzero(m))
    if n_pos == 0:
        raise ValueError("masks has no anomalous pixel; the metric is undefined")
    if n_pos == m.size:
        raise ValueError("masks has no normal pixel; the false-positive rate is undefined")
    return n_pos


def check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    return fpr_limit

