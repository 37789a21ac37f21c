"""A data set scored as the execution plan says (:mod:`.plan`): the device, precision and engine
it picks for a purpose, around :func:`ckaad_fast.evaluation.predict_dataset`. Calibrate scores
its set this way, and ``eval`` judges a checkpoint as it is deployed: a calibrated one in its
calibration's precision and by its engine (an int8 one by its quantized graph), an uncalibrated
one as trained (float32, PyTorch), unless told otherwise."""
from __future__ import annotations

from ..evaluation import evaluate_model
from ..precision import precision_name
from .engines import engine_module
from .plan import check_memory_engine, plan_device, plan_engine, plan_precision, uses_memory

__all__ = ["planned_module", "evaluate_planned"]


def planned_module(model, purpose: str, calibration=None, device=None, precision=None, engine=None,
                   quantized=None):
    """``(module, dtype, engine, device)``: what scores a data set for ``purpose`` (a module a
    data set is scored through, the precision it computes in, the engine's name, the
    torch.device), each choice asked for, else the calibration's, else the purpose's default.
    ``quantized``: the int8 graph to run (else the calibration's, where it has one)."""
    dev = plan_device(purpose, device)
    dtype = plan_precision(purpose, precision, calibration, dev, "precision")
    name = plan_engine(purpose, engine, calibration, dev, dtype, uses_memory(model.config))
    check_memory_engine(model.config, name)
    if quantized is None:
        quantized = getattr(calibration, "int8_graph", None)
    module, dtype = engine_module(model, name, dtype, quantized)
    return module, dtype, name, dev


def evaluate_planned(model, dataset, calibration=None, device=None, precision=None, engine=None,
                     **kwargs) -> dict:
    """:func:`~ckaad_fast.evaluation.evaluate_model` of ``model`` as the plan runs it for ``eval``
    (see the module); the metrics get ``plan``: the device, precision and engine that scored."""
    module, dtype, name, dev = planned_module(model, "eval", calibration, device, precision, engine)
    metrics = evaluate_model(module, dataset, device=dev, precision=dtype, **kwargs)
    if metrics is not None:
        metrics["plan"] = {"device": dev.type, "precision": precision_name(dtype), "engine": name}
    return metrics
