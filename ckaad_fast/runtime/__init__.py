"""The scoring forward outside eager PyTorch: as graphs of standard operators (:mod:`.graphs`: the
exported one, and the one the engines run), the execution plan that decides device, precision,
engine and top-k (:mod:`.plan`), and the execution engines that run the graphs on the CPU
(:mod:`.engines`: ONNX Runtime, OpenVINO, OpenVINO's int8 graph)."""
from .engines import RuntimeEngine, RuntimeModule, build_runtime_engine
from .graphs import INPUT_NAME, MAX_BATCH, OUTPUT_NAMES, EngineGraph, ScoringGraph, write_engine_onnx, write_onnx
from .plan import ENGINES, RUNTIME_ENGINES, resolve_engine

__all__ = ["ENGINES", "RUNTIME_ENGINES", "RuntimeEngine", "RuntimeModule", "build_runtime_engine",
           "resolve_engine", "INPUT_NAME", "MAX_BATCH", "OUTPUT_NAMES", "EngineGraph", "ScoringGraph",
           "write_engine_onnx", "write_onnx"]
