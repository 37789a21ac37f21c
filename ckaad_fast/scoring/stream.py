"""What a Scorer's stream yields: one :class:`ScoreResult` per file, in input order, with one
batch in flight while the previous one is read back; an unreadable file or a non-finite score
is an error result, never a verdict."""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .result import NON_FINITE_ERROR, ScoreResult

__all__ = ["ScoreResult", "NON_FINITE_ERROR", "stream_results"]


def stream_results(loader, launch, paths, return_maps, return_images, on_batch) -> Iterator[ScoreResult]:
    """The results of a stream of decoded batches (``loader``), each run by ``launch`` (the
    Scorer's), one batch in flight while the previous one is read back (see
    :meth:`~.engine.Scorer.score_paths`)."""
    # No context manager (inference_mode, autocast) is held across a yield: the caller's
    # code between two results runs in its own mode.
    it = iter(loader)
    pending = None
    try:
        for idx, imgs, errors in it:
            launched = None
            if imgs is not None:
                try:
                    h_scores, h_maps, done = launch(imgs, return_maps)
                except BaseException:
                    # Hand out the finished batch before the error: never lose results.
                    if pending is not None:
                        last, pending = pending, None
                        yield from _batch_results(paths, *last)
                    raise
                launched = (idx, h_scores, h_maps, imgs if return_images else None, done)
            if pending is not None:
                yield from _batch_results(paths, *pending)
            pending = (launched, errors)
            if on_batch is not None:
                on_batch()
        if pending is not None:
            last, pending = pending, None
            yield from _batch_results(paths, *last)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _batch_results(paths, launched, errors) -> Iterator[ScoreResult]:
    """The results of one batch, in input order (unreadable files were split out); waits
    for the batch's read-back to finish."""
    out: list[tuple[int, ScoreResult]] = [(i, ScoreResult(paths[i], None, None, err)) for i, err in errors]
    if launched is not None:
        idx, h_scores, h_maps, imgs, done = launched
        if done is not None:
            done.synchronize()
        s = h_scores.numpy()
        m = h_maps.numpy() if h_maps is not None else None
        im = None
        if imgs is not None:
            if imgs.dtype != torch.uint8:
                imgs = (imgs.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
            im = imgs.permute(0, 2, 3, 1).numpy()
        for j, i in enumerate(idx.tolist()):
            score = float(s[j])
            if not math.isfinite(score):
                # Fails closed: a NaN is no verdict, so it is an error, never "not anomalous".
                out.append((i, ScoreResult(paths[i], None, None, NON_FINITE_ERROR.format(score))))
                continue
            out.append((i, ScoreResult(
                paths[i],
                score,
                m[j].copy() if m is not None else None,
                None,
                im[j].copy() if im is not None else None,
            )))
    out.sort(key=lambda t: t[0])
    return iter([r for _, r in out])
