"""The ``onnxruntime`` engine: ONNX Runtime's CPU execution provider on the engine graph. It
computes in float32 only here (its CPU convolutions have no bfloat16 kernels)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..runtimes import onnxruntime_session
from .engine_base import RuntimeEngine

__all__ = ["OnnxRuntimeEngine"]


class OnnxRuntimeEngine(RuntimeEngine):
    """ONNX Runtime on the graph file ``path``, with ``threads`` threads in its operators."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        super().__init__(torch.float32, path)
        self._session = onnxruntime_session(path, threads)

    def run(self, images):
        return self._session.run(None, {"image": images})
