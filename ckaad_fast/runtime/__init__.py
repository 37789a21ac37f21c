"""The scoring forward outside eager PyTorch: as graphs of standard operators (:mod:`.graphs`: the
exported one, and the one the engines run), the execution plan that decides device, precision,
engine and top-k (:mod:`.plan`), and the execution engines that run the graphs on the CPU
(:mod:`.engines`: ONNX Runtime, OpenVINO, OpenVINO's int8 graph).

The names below are imported on first use (PEP 562), so that ``runtime.plan`` is read without
torch by a deployment that has none (:mod:`ckaad_fast.deployment`)."""
from ..lazy import exports

# Each public name, and the submodule that owns it.
__getattr__, __dir__, __all__ = exports(__name__, {
    "RuntimeEngine": "engines", "RuntimeModule": "engines", "build_runtime_engine": "engines",
    "INPUT_NAME": "graphs", "MAX_BATCH": "graphs", "OUTPUT_NAMES": "graphs", "EngineGraph": "graphs",
    "ScoringGraph": "graphs", "write_engine_onnx": "graphs", "write_onnx": "graphs",
    "ENGINES": "plan", "RUNTIME_ENGINES": "plan", "resolve_engine": "plan",
})
