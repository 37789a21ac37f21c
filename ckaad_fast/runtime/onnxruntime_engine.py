"""The ``onnxruntime`` engine: ONNX Runtime's CPU execution provider on the engine graph. It
computes in float32 only here (its CPU convolutions have no bfloat16 kernels)."""
from __future__ import annotations

from pathlib import Path

import torch

from .engine_base import RuntimeEngine

__all__ = ["OnnxRuntimeEngine"]


class OnnxRuntimeEngine(RuntimeEngine):
    """ONNX Runtime on the graph file ``path``, with ``threads`` threads in its operators."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        super().__init__(torch.float32, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, images):
        return self._session.run(None, {"image": images})
