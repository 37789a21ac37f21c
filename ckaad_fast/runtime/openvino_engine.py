"""The ``openvino`` engine: OpenVINO's CPU plugin, on the float engine graph
(:class:`OpenVinoEngine`) or on an int8 calibration's quantized copy of it
(:class:`Int8OpenVinoEngine`), compiled by :func:`ckaad_fast.runtimes.compile_openvino`, the one
place an OpenVINO model is compiled.

OpenVINO takes float32, and bfloat16 (its inference-precision hint) on CPUs with bfloat16 units;
elsewhere it computes float32 whatever the hint, and :attr:`OpenVinoEngine.dtype` says so."""
from __future__ import annotations

import torch

from ..runtimes import compile_openvino
from .engine_base import RuntimeEngine

__all__ = ["OpenVinoEngine", "Int8OpenVinoEngine"]


class OpenVinoEngine(RuntimeEngine):
    """OpenVINO on the float engine graph at ``path``, asked to compute in ``dtype``."""

    name = "openvino"

    def __init__(self, source, dtype: torch.dtype, threads: int, path=None):
        compiled = compile_openvino(source, "bf16" if dtype == torch.bfloat16 else "f32", threads)
        # What OpenVINO really runs in: bf16 only where the CPU has bf16 units.
        real = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        super().__init__(torch.bfloat16 if "bf16" in real else torch.float32, path)
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = compiled.outputs

    def run(self, images):
        # The input is a contiguous array the call outlives: no copy of it. The outputs are
        # copies (OpenVINO's default), owned by the caller.
        result = self._request.infer({0: images}, share_inputs=True)
        return [result[o] for o in self._outputs]


class Int8OpenVinoEngine(OpenVinoEngine):
    """OpenVINO on an int8 calibration's quantized graph (a
    :class:`~ckaad_fast.runtime.quantize.QuantizedGraph`, held in memory), checked to be of the
    model ``fingerprint`` at ``topk``; its precision is its quantizers'."""

    def __init__(self, quantized, fingerprint: str, topk, threads: int):
        quantized.check_for(fingerprint, topk)
        super().__init__(quantized.openvino_model(), torch.float32, threads)
        self.dtype = torch.int8
