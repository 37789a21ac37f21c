"""The execution plan: on which device, in which precision, by which engine and at which top-k a
model scores. The one owner of those run-time choices: calibrate, the Scorer (and so ``score``),
eval and export all ask it, and the command line's help reads its defaults from here.

One rule for every choice: **what was asked, else the calibration's choice, else the default**,
checked against one capability table (:data:`CAPABILITIES`). A calibrated model is scored as it
was calibrated, so that the calibration set's images get the decisions it promised; another
choice is allowed, with a warning that says what it can change.

The defaults (:data:`DEFAULTS`), and why they differ by purpose:

- device: a GPU where one is usable, else the CPU; export: the CPU (ONNX and OpenVINO graphs are
  exported there and run on any device their runtime has);
- precision: ``calibrate``, ``eval`` and ``export`` float32 (a threshold, metrics and a graph
  every engine and runtime computes alike, up to float32 rounding; an export follows an int8
  calibration, whose graph it carries); ``score`` of an uncalibrated model ``auto`` (the fastest
  that keeps scores within bfloat16 rounding, :mod:`ckaad_fast.precision`);
- engine: ``calibrate`` ``auto`` (the fastest here: production then scores with it, since the
  Scorer follows the calibration); ``score`` of an uncalibrated model and ``eval`` ``torch`` (the
  model's own forward; no graph to export first);
- a tiled model that decides by its feature memory (``ModelConfig.memory_candidates``) runs on
  torch for every purpose: the memory's lookup is not in any exported graph (:func:`uses_memory`);
- top-k: the model's (``ModelConfig.topk``, whose default is :data:`ckaad_fast.ops.DEFAULT_TOPK`);
  ``"mean"`` is the spelling of ``None`` (the mean of the whole map) on the command line.

Beside these, the tiling is the model's (``ModelConfig.tiling``, recorded in the checkpoint) and
the sensitivity's default is :data:`ckaad_fast.head.DEFAULT_SENSITIVITY`: each has its one owner
there. A calibration records the plan it was computed with (precision, device kind, engine; the
top-k is its model's).
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING

from ..errors import ArgumentError
from ..precision import (INT8, canonical_precision, cpu_has_bf16_matmul, cuda_usable, default_device, precision_name,
                         resolve_device, resolve_precision)

if TYPE_CHECKING:  # torch is imported by what runs a network, never by the plan's tables
    import torch

__all__ = ["ENGINES", "RUNTIME_ENGINES", "PURPOSES", "DEFAULTS", "CAPABILITIES", "FORMAT_PRECISIONS", "FORMAT_DEVICES",
           "plan_precision", "plan_engine", "plan_topk", "plan_device", "device_name", "plan_export", "resolve_engine",
           "engine_supports", "engine_installed", "default_of", "uses_memory", "check_memory_engine"]

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
#: The engines that run an exported graph (on the CPU).
RUNTIME_ENGINES = ("onnxruntime", "openvino")
#: What a plan is made for.
PURPOSES = ("calibrate", "score", "eval", "export")

#: The defaults, per purpose (see the module for why they differ). "device" None: a GPU where one
#: is usable, else the CPU (:func:`ckaad_fast.devices.default_device`).
DEFAULTS = {
    "calibrate": {"device": None, "precision": "float32", "engine": "auto"},
    "score": {"device": None, "precision": "auto", "engine": "torch"},
    "eval": {"device": None, "precision": "float32", "engine": "torch"},
    "export": {"device": "cpu", "precision": "float32", "engine": None},
}

#: The capability table: for each engine, the devices it runs on and the precisions it computes
#: in there ("bfloat16*": only on a CPU with bfloat16 matrix units, where OpenVINO honours its
#: hint; elsewhere it would compute float32 whatever it was told). int8 is the quantized graph
#: an int8 calibration carries, which only OpenVINO runs (:mod:`.quantize`).
CAPABILITIES = {
    "torch": {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "bfloat16", "float16")},
    "onnxruntime": {"cpu": ("float32",)},
    "openvino": {"cpu": ("float32", "bfloat16*", INT8)},
}
#: The precisions each export format's graph can hold (ONNX Runtime refuses bfloat16 convolutions;
#: int8 is NNCF's quantizers, which only OpenVINO IR carries), and the devices it is exported on.
FORMAT_PRECISIONS = {"onnx": ("float32", "float16"), "openvino": ("float32", "float16", INT8),
                     "pt2": ("float32", "float16", "bfloat16")}
FORMAT_DEVICES = {"onnx": ("cpu",), "openvino": ("cpu",), "pt2": ("cpu", "cuda")}
#: ``auto``'s order on the CPU, fastest first (docs/BENCHMARKS.md).
_CPU_ORDER = ("openvino", "onnxruntime")


def default_of(purpose: str, choice: str):
    """The default of ``choice`` ("device", "precision", "engine") for ``purpose``, as the
    command line's help shows it."""
    value = DEFAULTS[purpose][choice]
    if choice == "device" and value is None:
        return "cuda if usable, else cpu"
    return value


def device_name(purpose: str, device=None):
    """The device asked for, else the purpose's default (see :data:`DEFAULTS`), unchecked: what a
    command hands on (to torchrun's process group, say) before it builds anything."""
    return device if device is not None else (DEFAULTS[purpose]["device"] or default_device())


def plan_device(purpose: str, device=None) -> torch.device:
    """:func:`device_name`, checked usable, as a torch.device (a CUDA one with its index)."""
    return resolve_device(device_name(purpose, device))


def engine_installed(name: str) -> bool:
    """Whether the runtime ``name`` can run here: its module is installed, and so is onnxscript
    (torch's ONNX exporter, which writes the graph it runs)."""
    return importlib.util.find_spec(name) is not None and importlib.util.find_spec("onnxscript") is not None


def engine_supports(engine: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``engine`` computes in ``dtype`` on a ``device_type`` (the capability table)."""
    have = CAPABILITIES[engine].get(device_type, ())
    name = precision_name(dtype)
    return name in have or (f"{name}*" in have and cpu_has_bf16_matmul())


def resolve_engine(engine: str, device: torch.device, dtype: torch.dtype) -> str:
    """The engine ``engine`` means on ``device`` in ``dtype`` (``auto``: torch on a GPU; on the CPU
    the fastest installed runtime that computes in ``dtype``, else torch);
    :class:`~ckaad_fast.errors.ArgumentError` naming ``engine`` for one that cannot run here."""
    if engine not in ENGINES:
        raise ArgumentError("engine", f"must be one of {ENGINES}, got {engine!r}")
    kind = device.type
    if engine == "auto":
        if kind != "cpu":
            return "torch"
        usable = [e for e in _CPU_ORDER if engine_installed(e) and engine_supports(e, kind, dtype)]
        if not usable and precision_name(dtype) == INT8:
            raise ArgumentError("engine", "int8 runs on the openvino engine, which is not installed here: "
                                          "pip install 'ckaad_fast[export]'")
        return usable[0] if usable else "torch"
    if engine == "torch" and precision_name(dtype) != INT8:
        return engine
    if engine != "torch" and kind not in CAPABILITIES[engine]:
        raise ArgumentError("engine", f"{engine} runs on the CPU here; on {kind} use torch (or auto)")
    if engine != "torch" and not engine_installed(engine):
        raise ArgumentError("engine", f"{engine} is not installed: pip install 'ckaad_fast[export]'")
    if not engine_supports(engine, kind, dtype):
        if precision_name(dtype) == INT8:
            raise ArgumentError("engine", f"{engine} cannot run the int8 graph (openvino only): use engine openvino "
                                          "(or auto), or dtype float32 to score the float model instead")
        raise ArgumentError("engine", f"{engine} cannot compute in {precision_name(dtype)} here (onnxruntime: "
                                      "float32 only; openvino: bfloat16 only on a CPU with bfloat16 units): pass "
                                      "dtype float32, or engine torch")
    return engine


def _calibrated_precision(calibration) -> str | None:
    return None if calibration is None else (calibration.precision or "float32")


def plan_precision(purpose: str, asked, calibration, device: torch.device, argument: str = "dtype") -> torch.dtype:
    """The precision: ``asked``, else the calibration's, else the purpose's default; a warning
    when it differs from the calibration's, or when it would be emulated on this CPU."""
    calibrated = _calibrated_precision(calibration)
    name = asked if asked is not None else (calibrated or DEFAULTS[purpose]["precision"])
    chosen = resolve_precision(name, device, argument, int8=True)
    if calibrated is not None and precision_name(chosen) != calibrated:
        warnings.warn(
            f"scoring in {precision_name(chosen)} a model calibrated in {calibrated}: scores move by about 1e-3 "
            f"relative (up to 3e-2; int8 more), so images near the threshold can be decided differently from the "
            f"calibration's promise; leave {argument} out (or pass {calibrated!r}) to score as it was calibrated",
            UserWarning, stacklevel=3)
    if precision_name(chosen) == "bfloat16" and device.type == "cpu" and not cpu_has_bf16_matmul():
        warnings.warn(
            "scoring in bfloat16 on a CPU without bfloat16 matrix units (AMX, AVX-512 BF16): it is emulated, about "
            "12x slower than float32 (measured on a 2-core AVX2 EPYC); calibrate in float32 for such machines",
            UserWarning, stacklevel=3)
    if calibration is not None and calibration.device not in (None, device.type):
        warnings.warn(
            f"scoring on {device.type} a model calibrated on {calibration.device}: the two compute float32 "
            "convolutions differently (a GPU uses TF32 by default), which moves scores by about 1e-4 relative; "
            "images that close to the threshold can be decided differently from the calibration's promise",
            UserWarning, stacklevel=3)
    return chosen


def plan_engine(purpose: str, asked: str | None, calibration, device: torch.device, dtype: torch.dtype,
                torch_only: bool = False) -> str:
    """The engine: ``asked``, else the calibration's (the engine whose scores its threshold was
    picked on; torch with a warning where that one cannot run here), else the purpose's default.
    "torch" whenever ``torch_only`` (compile or CUDA graphs were asked for) and nothing else was.
    int8 runs on OpenVINO whatever the default. A warning when a calibrated model is scored by
    another engine than its calibration's: float32 engines agree to about 1e-6 relative, so only
    an image that close to the threshold can be decided differently."""
    if precision_name(dtype) == INT8:  # the calibration's quantized graph, which only OpenVINO runs
        if torch_only:
            raise ArgumentError("dtype", "int8 runs on the openvino engine; compile and cuda_graphs are torch's")
        return resolve_engine("openvino" if asked in (None, "auto") else asked, device, dtype)
    calibrated = None if calibration is None else (calibration.engine or "torch")
    if torch_only and asked in (None, "auto"):
        chosen = "torch"
    elif asked is None:
        if calibrated is None:
            return resolve_engine(DEFAULTS[purpose]["engine"], device, dtype)
        try:
            return resolve_engine(calibrated, device, dtype)
        except ValueError as e:  # not installed here, or not for this device or precision
            warnings.warn(f"the model was calibrated with the {calibrated} engine, which cannot run here ({e}); "
                          "scoring with torch", UserWarning, stacklevel=3)
            return "torch"
    else:
        chosen = resolve_engine(asked, device, dtype)
    if calibrated is not None and chosen != calibrated:
        warnings.warn(
            f"scoring with the {chosen} engine a model calibrated with {calibrated}: their float32 scores differ "
            f"by about 1e-6 relative, so an image that close to the threshold can be decided differently from the "
            f"calibration's promise; leave the engine out (or pass {calibrated!r}) to score as it was calibrated",
            UserWarning, stacklevel=3)
    return chosen


def uses_memory(config) -> bool:
    """Whether a model decides by its feature memory (a tiled model's default), which runs in
    PyTorch only: its plans are made with ``torch_only``."""
    return bool(getattr(config, "memory_candidates", None))


def check_memory_engine(config, engine: str) -> None:
    """An :class:`ArgumentError` naming ``engine`` when a runtime engine would score a model that
    decides by its feature memory: the exported graph scores tiles, and the memory's lookup of
    the full image's features is not in it."""
    if uses_memory(config) and engine in RUNTIME_ENGINES:
        raise ArgumentError("engine", f"this tiled model decides by its feature memory, which runs in PyTorch: use "
                            f"the torch engine, not {engine} (or train with memory_candidates=0 for the top-k rule)")


def plan_topk(asked, config, image_size=None) -> int | None:
    """The top-k: ``asked`` (a positive int, or "mean" for the whole map's mean), else the model's
    (``config.topk``, which its calibration was computed at). ``image_size``: the maps' (H, W),
    which bounds it. A model that decides by its feature memory takes none: its top-k decides nothing."""
    if asked is None:
        return config.topk
    if uses_memory(config):
        raise ArgumentError("topk", "this tiled model decides by its feature memory, not by the map's top-k: "
                            "leave topk out")
    if isinstance(asked, str):
        if asked != "mean":
            raise ArgumentError("topk", f"must be a positive int, None (the model's) or 'mean', got {asked!r}")
        return None
    h, w = tuple(image_size if image_size is not None else config.image_size)
    if isinstance(asked, bool) or not isinstance(asked, int) or not 1 <= asked <= h * w:
        raise ArgumentError("topk", f"must be an int in [1, H*W = {h * w}], None (the model's) or 'mean', got {asked!r}")
    return asked


def plan_export(format: str, dtype, device, calibration=False) -> tuple[str | None, str]:
    """An export's ``(precision, device)``: the precision asked for, else int8 for an int8
    calibration exported to OpenVINO (the graph it carries), else float32 (see the module); the
    device asked for, else the CPU. Checked against what ``format`` holds and is exported on.
    ``calibration`` False: the checkpoint is not read yet; only what was asked is checked (and
    the precision stays None where nothing was asked)."""
    if dtype is None and calibration is False:
        name = None
    elif dtype is None:
        dtype = INT8 if _calibrated_precision(calibration) == INT8 and INT8 in FORMAT_PRECISIONS[format] \
            else DEFAULTS["export"]["precision"]
    if dtype is not None:
        name = canonical_precision(dtype, "dtype", int8=True)
    if name == "auto":  # a graph has one precision
        raise ArgumentError("dtype", f"must name one precision ({', '.join(FORMAT_PRECISIONS[format])}), not auto")
    if name is not None and name not in FORMAT_PRECISIONS[format]:
        where = {INT8: "--format openvino (NNCF's quantizers)", "bfloat16": "--format pt2 (ONNX Runtime refuses "
                 "bfloat16 convolutions)"}.get(name, "another format")
        raise ArgumentError("dtype", f"{name} graphs are for {where}; {format} takes "
                                     f"{' or '.join(p for p in FORMAT_PRECISIONS[format] if p != INT8)}")
    device = str(DEFAULTS["export"]["device"] if device is None else device)
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda") or (kind == "cpu" and device != "cpu"):
        raise ArgumentError("device", f"must be cpu or cuda[:N], got {device!r}")
    if kind not in FORMAT_DEVICES[format] or (kind == "cuda" and not cuda_usable()):
        raise ArgumentError("device", "cuda is for --format pt2 on a machine with a GPU; onnx and openvino "
                                      "graphs are exported on the CPU and run on any device their runtime has")
    if calibration is False:
        return name, device
    if name == INT8 and _calibrated_precision(calibration) != INT8:
        raise ArgumentError("dtype", "int8 needs a checkpoint calibrated in int8 (ckaad-fast calibrate --dtype int8), "
                                     "which carries the quantized graph and the threshold picked on its scores")
    if calibration is not None and _calibrated_precision(calibration) != name:
        warnings.warn(f"exporting in {name} a model calibrated in {_calibrated_precision(calibration)}: decisions "
                      "near the threshold can differ from the calibration's", UserWarning, stacklevel=3)
    return name, device
