"""Whether a Scorer needs the PyTorch network at all (:func:`graph_detector`): not where the
execution plan (:mod:`ckaad_fast.runtime.plan`) gives it a runtime engine whose graph is already
there."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..model import ModelConfig, checkpoint_fingerprint, config_from_checkpoint
from ..runtime.engines import cached_engine_graph, cached_graph_problem
from ..runtime.plan import RUNTIME_ENGINES, plan_device, plan_engine, plan_precision, plan_topk, uses_memory

__all__ = ["GraphDetector", "graph_detector"]


@dataclass(frozen=True)
class GraphDetector:
    """A detector known by its configuration and fingerprint only, for a Scorer whose runtime
    engine runs a graph that is already there (the engine cache's, or an int8 calibration's):
    such a Scorer never builds the PyTorch network, which on a 2-core CPU cost 2.2 s of a
    14 s ``ckaad-fast score`` (docs/BENCHMARKS.md)."""

    config: ModelConfig
    fingerprint: str


def graph_detector(ckpt: dict, calibration, device, options: dict) -> GraphDetector | None:
    """The :class:`GraphDetector` of a checkpoint dict when a Scorer with these ``options``
    (Scorer's keyword arguments) on ``device`` would run a runtime engine whose graph needs no
    export; None otherwise (and whenever an option is wrong: the Scorer built the usual way
    says what is wrong)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Scorer itself warns, once
            dev = plan_device("score", device)
            dtype = plan_precision("score", options.get("dtype"), calibration, dev)
            config = config_from_checkpoint(ckpt)
            torch_only = bool(options.get("compile") or options.get("cuda_graphs")) or uses_memory(config)
            engine = plan_engine("score", options.get("engine"), calibration, dev, dtype, torch_only)
        if engine not in RUNTIME_ENGINES or uses_memory(config):
            return None
        topk = plan_topk(options.get("topk"), config)
        weights = checkpoint_fingerprint(ckpt)
    except (ValueError, TypeError):
        return None
    if dtype == torch.int8 or cached_graph_problem(cached_engine_graph(weights, topk), weights, topk) is None:
        return GraphDetector(config, weights)
    return None
