"""The whole scoring forward as one graph that runs outside Python: ONNX (ONNX Runtime), OpenVINO
IR, and a model repository for NVIDIA Triton Inference Server.

:class:`ScoringGraph` is what a production line deploys: ``image`` (B, 3, H, W) uint8 RGB in,
``score`` (B,), ``normalized_score`` (B,), ``is_anomalous`` (B,) bool and ``anomaly_map``
(B, H, W) float32 out. It normalises the raw pixels, runs the backbone and the auto-encoder, and
computes the anomaly map and the image score through the one inference head in its
standard-operator form (:func:`ckaad_fast.ops.anomaly_map_standard_ops`, the fused op's own
decomposition: sums of products for the cosine map, two small matrix products per layer for the
upsampling and the blur), so the exported graph needs no custom operator. With a calibration in
the checkpoint (:mod:`ckaad_fast.calibration`), the normalised score and the decision are computed
in the graph too, exactly as the Scorer decides; the ONNX graph takes the sensitivity as an
optional second input (``sensitivity``, float64 [1], default the export's), so a line moves its
operating point without exporting again (OpenVINO IR and pt2 decide at the export's); without one, ``normalized_score`` is the raw score and ``is_anomalous`` is all false,
and the sidecar says ``"calibrated": false``.

A checkpoint calibrated in int8 (``ckaad-fast calibrate --dtype int8``) exports to OpenVINO as its
quantized graph (:func:`ckaad_fast.runtime.quantize.int8_scoring_model`: the same interface, the
threshold picked on that graph's scores), with the quantization report (what was quantized, the
AUROC drop on the check set, how far scores moved) in the sidecar's calibration.

:func:`export` writes ``model.onnx`` (or OpenVINO's ``model.xml`` and ``model.bin``) and
``model.json``, the sidecar with the model's fingerprint, image size, normalisation, calibration
and the tool's and torch's versions; :func:`write_triton_repository` puts the ONNX file into a
Triton Inference Server model repository with its ``config.pbtxt`` (dynamic batching), checked
by parsing it with the model configuration schema that ``tritonclient`` ships.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_path, atomic_write_json, atomic_write_text
from .calibration import read_calibration
from .errors import ArgumentError
from .runtime.graphs import INPUT_NAME, MAX_BATCH, OUTPUT_NAMES, SENSITIVITY_NAME, ScoringGraph, dynamic_batch, write_onnx
from .runtime.plan import plan_export, uses_memory
from .runtime.quantize import int8_scoring_model
from .head import DEFAULT_SENSITIVITY, check_sensitivity
from .model import fingerprint, load_checkpoint, model_from_checkpoint
from .precision import torch_dtype

# ScoringGraph and the graph constants live in .runtime.graphs (a floor below, shared with the Scorer's
# engines) and are named here too, where an exporting user looks for them.
__all__ = ["ScoringGraph", "export", "export_onnx", "write_triton_repository", "triton_config", "FORMATS", "DEFAULT_FORMAT",
           "INPUT_NAME", "OUTPUT_NAMES", "MAX_BATCH", "check_triton_options"]

FORMATS = ("onnx", "openvino", "pt2")
#: The format ``export`` writes unless told which.
DEFAULT_FORMAT = FORMATS[0]
_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "pt2": "model.pt2"}


def export_onnx(checkpoint, out_dir, batch: int | None = None, sensitivity: float = DEFAULT_SENSITIVITY,
                overwrite: bool = False) -> Path:
    """Export the scoring forward of ``checkpoint`` to ``out_dir/model.onnx`` (with its sidecar
    ``model.json``); ``batch``: a fixed batch size, or None for a dynamic one. Returns the file."""
    return export(checkpoint, out_dir, "onnx", batch, sensitivity, overwrite)


def export(checkpoint, out_dir, format: str = DEFAULT_FORMAT, batch: int | None = None,
           sensitivity: float = DEFAULT_SENSITIVITY, overwrite: bool = False, device: str | None = None,
           dtype: str | None = None) -> Path:
    """Export the scoring forward of ``checkpoint`` into ``out_dir`` as ``format`` ("onnx":
    model.onnx; "openvino": model.xml and model.bin; "pt2": an AOTInductor package, model.pt2,
    compiled for ``device``), with the sidecar ``model.json``. ``dtype``: the backbone's and the
    auto-encoder's ("float32", "float16", "bfloat16"; the maps and scores stay float32), or
    "int8" (openvino only): the int8 calibration's quantized graph, as calibrated. None, for
    ``dtype`` and ``device``: the execution plan's (:func:`ckaad_fast.runtime.plan.plan_export`:
    int8 for an int8-calibrated checkpoint exported to OpenVINO, else float32; the CPU). Returns
    the model file.
    Errors are :class:`~ckaad_fast.errors.ArgumentError` naming the argument."""
    if format not in FORMATS:
        raise ArgumentError("format", f"must be one of {FORMATS}, got {format!r}")
    plan_export(format, dtype, device)  # what the format cannot hold, refused before anything is read
    out = Path(out_dir)
    target = out / _FILES[format]
    if target.exists() and not overwrite:
        raise ArgumentError("out", f"{str(target)!r} exists: choose another folder or --overwrite")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH):
        raise ArgumentError("batch", f"must be an int in [1, {MAX_BATCH}] or dynamic, got {batch!r}")
    try:
        sensitivity = check_sensitivity(sensitivity)
    except ValueError as e:
        raise ArgumentError("sensitivity", str(e).removeprefix("sensitivity ")) from None
    ckpt = _load(checkpoint)
    try:
        model = model_from_checkpoint(ckpt)
        calibration = read_calibration(ckpt)
    except ValueError as e:
        raise ArgumentError("checkpoint", str(e)) from None
    if uses_memory(model.config):
        raise ArgumentError("checkpoint", "this tiled model decides by its feature memory, which an exported graph "
                            "does not carry yet (it scores tiles; the memory looks up the whole image's features): "
                            "score it with ckaad-fast score, or train with --memory-candidates 0 to export")
    dtype, device = plan_export(format, dtype, device, calibration)
    graph_dtype = None if dtype == "int8" else torch_dtype(dtype, "dtype")
    out.mkdir(parents=True, exist_ok=True)
    if dtype == "int8":
        cfg = model.config
        _write_openvino(int8_scoring_model(calibration.int8_graph, calibration, sensitivity, cfg.mean, cfg.std),
                        target, batch, tuple(cfg.image_size))
    else:
        graph = ScoringGraph(model, calibration, sensitivity, graph_dtype).eval()
        if format == "onnx":
            write_onnx(graph, target, batch)
        elif format == "openvino":
            _write_openvino(graph, target, batch)
        else:
            _write_pt2(graph, target, batch, device)
    atomic_write_json(out / "model.json", _sidecar(model, calibration, target, format, batch, sensitivity, device,
                                                   dtype, checkpoint))
    return target


def _sidecar(model, calibration, target: Path, format: str, batch, sensitivity: float, device, dtype: str,
             checkpoint) -> dict:
    """``model.json``: what a deployment needs beside the graph (see the module)."""
    h, w = model.config.image_size
    return {
        "format": format,
        "file": target.name,
        "model_sha256": fingerprint(model),
        "backbone": model.config.backbone,
        "layers": list(model.config.layers),
        "image_size": [h, w],
        # What else makes a score (a results folder's manifest records them: scoring.deployed).
        "topk": model.config.topk,
        "sigma": model.config.sigma,
        "border": model.config.border,
        # The batch sizes the graph was exported for. ONNX Runtime and OpenVINO do not check a
        # dynamic batch's bounds (see docs/CLI.md, "export"): a server in front of them should.
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW RGB", "batch": batch or "dynamic",
                  "batch_range": [batch, batch] if batch else [1, MAX_BATCH]},
        # The operating point at run time (ONNX only): one float64 value in [0, 1] (shape [1])
        # for the call, optional (its default is an initializer). OpenVINO's converter folds
        # that default into the IR and pt2 takes the image alone: both decide at "sensitivity".
        "sensitivity_input": ({"name": SENSITIVITY_NAME, "dtype": "float64", "shape": [1], "default": sensitivity,
                               "optional": True} if format == "onnx" else None),
        "outputs": list(OUTPUT_NAMES),
        "normalization": {"mean": list(model.config.mean), "std": list(model.config.std)},
        # A tiled model's graph scores tiles; the client tiles and stitches (docs/CLI.md, "Tiled
        # models"), and the image's score and decision come from the stitched map, not the tiles'.
        "tiling": _tiling_record(model.config),
        "calibrated": calibration is not None,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "sensitivity": sensitivity,
        # At the default sensitivity; other sensitivities move it (head.decision_threshold).
        "decision_threshold": calibration.decision_threshold(sensitivity) if calibration is not None else None,
        "device": str(device),
        "dtype": dtype,
        "tool": f"ckaad_fast {__version__}",
        "torch": torch.__version__,
        "checkpoint": os.fspath(checkpoint),
    }


def _tiling_record(config) -> dict | None:
    """How a deployment tiles an image for a tiled model (None: the image is resized whole)."""
    tiling = config.tiling
    if tiling is None:
        return None
    return {**tiling.to_dict(), "input_size": list(config.image_size),
            "grid": "starts 0, stride, 2 stride, ... and a last tile ending at the image's edge, per axis",
            "window": "per axis: min(1, (j + 0.5) / r, (size - j - 0.5) / r) with r = size - stride (1 when r = 0), "
                      "divided at each pixel by the sum over the tiles covering it; 2-D weight = product",
            "tile_resize": "bilinear, antialiased, to input_size and back (only when size != input_size)",
            "image_score": {"rule": "mean of the topk largest values of the stitched map" if config.topk else
                            "mean of the stitched map", "topk": config.topk},
            "decide": "image_score >= decision_threshold (the graph's own decision is per tile)"}


def _write_pt2(graph: ScoringGraph, target: Path, batch: int | None, device: str) -> None:
    """torch.export, then AOTInductor: a package that ``torch._inductor.aoti_load_package`` runs
    from C++ or Python without the model's code (Inductor writes its own kernels for the graph)."""
    graph = graph.to(device)
    # The image alone: the package decides at the export's sensitivity (torch.export has no
    # optional inputs, and a required one would change every caller).
    image = graph.example_inputs(batch or 2, device)[:1]
    dynamic = None if batch is not None else {INPUT_NAME: dynamic_batch(graph)[INPUT_NAME]}
    with torch.no_grad():
        program = torch.export.export(graph, image, dynamic_shapes=dynamic)
    # The packager insists on a name ending in .pt2: a temporary one beside the target, renamed.
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.pt2")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load(checkpoint) -> dict:
    """The checkpoint dict; its errors name the argument."""
    try:
        return load_checkpoint(checkpoint)
    except (ValueError, FileNotFoundError) as e:
        raise ArgumentError("checkpoint", str(e)) from None


def _write_openvino(graph, target: Path, batch: int | None, image_size=None) -> None:
    """``graph`` (a :class:`ScoringGraph`, through ONNX; or an OpenVINO model of ``image_size``,
    the int8 one) as OpenVINO IR at ``target``, the .xml and .bin written together."""
    try:
        import openvino as ov
    except ImportError:
        raise ArgumentError("format", "openvino needs the export extra: pip install 'ckaad_fast[export]'") from None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(graph, ScoringGraph):
            onnx_file = Path(tmp) / "model.onnx"
            write_onnx(graph, onnx_file, batch)
            model = ov.convert_model(str(onnx_file))
        else:
            model = graph
            if batch is not None:
                model.reshape({0: [batch, 3, *image_size]})
        # Into a temporary folder beside the target, then renamed: the .xml and .bin are a pair.
        staging = Path(tempfile.mkdtemp(prefix=".openvino.", dir=target.parent))
        try:
            ov.save_model(model, str(staging / target.name), compress_to_fp16=False)
            os.replace(staging / target.with_suffix(".bin").name, target.with_suffix(".bin"))
            os.replace(staging / target.name, target)
        finally:
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()


# ------------------------------------------------------------------------------------------------
# NVIDIA Triton Inference Server
# ------------------------------------------------------------------------------------------------
def check_triton_options(format: str, batch: int | None, max_batch_size) -> None:
    """Refuse, before anything is written, options a Triton model repository cannot take."""
    if format != "onnx" or batch is not None:
        raise ArgumentError("triton_repo", "needs an ONNX export with a dynamic batch (--format onnx --batch dynamic)")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= MAX_BATCH:
        raise ArgumentError("max_batch_size", f"must be an int in [1, {MAX_BATCH}] (the graph's batch bound), "
                                              f"got {max_batch_size!r}")


def triton_config(name: str, image_size, max_batch_size: int = 64) -> str:
    """The ``config.pbtxt`` of the exported ONNX graph under Triton's ONNX Runtime backend, with
    dynamic batching (the batch dimension is implicit in Triton's dims)."""
    h, w = image_size
    per_image = '    dims: [ 1 ]\n    reshape: { shape: [ ] }'
    outputs = [("score", "TYPE_FP32", per_image), ("normalized_score", "TYPE_FP32", per_image),
               ("is_anomalous", "TYPE_BOOL", per_image), ("anomaly_map", "TYPE_FP32", f"    dims: [ {h}, {w} ]")]
    out_text = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n{d}\n  }}' for n, t, d in outputs)
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            # The sensitivity input is left out: under dynamic batching every input carries the
            # batch dimension, which the graph's one-value sensitivity does not; the graph's
            # default (an initializer) decides.
            f'input [\n  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_UINT8\n    dims: [ 3, {h}, {w} ]\n  }}\n]\n'
            f"output [\n{out_text}\n]\n"
            "dynamic_batching { }\n")


#: A Triton Inference Server repository's largest batch, unless told otherwise.
TRITON_MAX_BATCH = 64


def write_triton_repository(onnx_file, repo_dir, name: str = "ckaad", max_batch_size: int = TRITON_MAX_BATCH) -> Path:
    """Put an exported ``model.onnx`` (dynamic batch) into ``repo_dir/name/1/`` with
    ``repo_dir/name/config.pbtxt``; the configuration is parsed with ``tritonclient``'s schema
    when it is installed, so a mistake fails here, not in the server. Returns the config file."""
    import shutil

    onnx_file = Path(onnx_file)
    check_triton_options("onnx", None, max_batch_size)
    side = onnx_file.with_name("model.json")
    meta = json.loads(side.read_text()) if side.is_file() else {}
    if meta.get("format") != "onnx" or meta.get("input", {}).get("batch") != "dynamic":
        raise ArgumentError("triton_repo", "needs an ONNX export with a dynamic batch (--format onnx --batch dynamic)")
    text = triton_config(name, meta["image_size"], max_batch_size)
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        pass  # the schema check needs the export extra; the file is written all the same
    else:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    version = Path(repo_dir) / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    with atomic_path(version / "model.onnx") as tmp:
        shutil.copyfile(onnx_file, tmp)
    atomic_write_text(Path(repo_dir) / name / "config.pbtxt", text)
    return Path(repo_dir) / name / "config.pbtxt"
