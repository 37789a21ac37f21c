"""The one place a graph is loaded into ONNX Runtime or compiled by OpenVINO, torch-free: the
Scorer's engines (:mod:`ckaad_fast.runtime`), int8 quantization's measurements and the
deployment client (:mod:`ckaad_fast.deployment`) all open their graphs here."""
from __future__ import annotations

from .signal_stack import ensure_signal_stack

__all__ = ["onnxruntime_session", "compile_openvino"]


def onnxruntime_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session of the ONNX file ``path``, with ``threads`` threads in its
    operators (None: the runtime's choice) and one between them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compile_openvino(model, hint: str = "f32", threads: int | None = None):
    """``model`` (an ``ov.Model``, or an IR or ONNX file's path) compiled for the CPU with the
    inference-precision ``hint`` ("f32" or "bf16"; an int8 graph's quantizers set their own
    precision, the operations left in float run in the hint's) and, when given, ``threads``."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": hint}
    if threads is not None:
        config.update({"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    compiled = ov.Core().compile_model(model if isinstance(model, ov.Model) else str(model), "CPU", config)
    # A process's first compile puts back a small alternate signal stack on this thread (measured:
    # faulthandler's 9,968 bytes, OpenVINO 2026.4), on which the SIGCHLD handler of DataLoader
    # workers started later overflows and crashes the process (ckaad_fast.signal_stack).
    ensure_signal_stack()
    return compiled
