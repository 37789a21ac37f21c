"""The scoring forward outside eager PyTorch: as graphs of standard operators (:mod:`.graphs`: the
exported one, and the one the engines run) and the execution engines that run them on the CPU
(:mod:`.engines`: ONNX Runtime, OpenVINO; and the rule that picks one)."""
from .engines import (
    ENGINES,
    RUNTIME_ENGINES,
    RuntimeEngine,
    RuntimeModule,
    build_runtime_engine,
    resolve_engine,
)
from .graphs import INPUT_NAME, MAX_BATCH, OUTPUT_NAMES, EngineGraph, ScoringGraph, write_engine_onnx, write_onnx

__all__ = ["ENGINES", "RUNTIME_ENGINES", "RuntimeEngine", "RuntimeModule", "build_runtime_engine",
           "resolve_engine", "INPUT_NAME", "MAX_BATCH", "OUTPUT_NAMES", "EngineGraph", "ScoringGraph",
           "write_engine_onnx", "write_onnx"]
