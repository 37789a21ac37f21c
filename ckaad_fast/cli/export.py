"""``ckaad-fast export``: the whole scoring forward as one graph for runtimes outside Python (a thin
layer over :mod:`ckaad_fast.export`)."""
from __future__ import annotations

import argparse

from ..decisions import DEFAULT_SENSITIVITY
from ..runtime.plan import default_of
from . import COMMANDS
from ._types import add_tiling_arguments, given, precision_or_int8, unit_float


def _batch(text: str):
    if text == "dynamic":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'dynamic', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'dynamic', got {text!r}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..export import DEFAULT_FORMAT, FORMATS, TRITON_MAX_BATCH

    p = subparsers.add_parser(
        "export",
        help=COMMANDS["export"],
        description="Export a checkpoint's whole scoring forward as one graph with standard operators only: "
                    "normalisation of uint8 RGB input, backbone, auto-encoder, anomaly map, image score and, for a "
                    "calibrated checkpoint (ckaad-fast calibrate), the normalised score and the decision. Writes "
                    "OUT/model.onnx and OUT/model.json (fingerprint, image size, normalisation, calibration, versions).",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint written by ckaad-fast train (or its output folder)")
    p.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                   help="onnx: for ONNX Runtime (OUT/model.onnx); openvino: OpenVINO IR (OUT/model.xml and .bin); "
                        "pt2: an AOTInductor package for torch._inductor.aoti_load_package (OUT/model.pt2; a "
                        "compilation of a minute or more) (default: %(default)s)")
    p.add_argument("--dtype", type=precision_or_int8, default=None, metavar="float32|float16|bfloat16|int8",
                   help="the backbone's and auto-encoder's dtype in the graph; the maps and scores stay float32 "
                        "(bfloat16 suits pt2 on CPUs with AMX and on GPUs). int8 (--format openvino): the quantized "
                        "graph of a checkpoint calibrated with calibrate --dtype int8, with its threshold. Default: "
                        "int8 for such a checkpoint exported to openvino, else float32")
    p.add_argument("--device", default=None, metavar="cpu|cuda",
                   help=f"with --format pt2: the device the package is compiled for (default: {default_of('export', 'device')})")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--batch", type=_batch, default=None, metavar="N|dynamic",
                   help="a fixed batch size, or dynamic (default)")
    p.add_argument("--sensitivity", type=unit_float, default=DEFAULT_SENSITIVITY, metavar="S",
                   help="the decision built into the graph for a calibrated checkpoint: is_anomalous when "
                        "normalized_score >= 1 - S (default: %(default)s, the calibrated threshold)")
    p.add_argument("--triton-repo", metavar="DIR",
                   help="also write a model repository for NVIDIA Triton Inference Server: DIR/ckaad/1/model.onnx "
                        "and DIR/ckaad/config.pbtxt (ONNX Runtime backend, dynamic batching); needs --format onnx "
                        "and a dynamic batch")
    p.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help=f"with --triton-repo: the server's largest batch (default: {TRITON_MAX_BATCH})")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    add_tiling_arguments(p, sets=False)
    p.set_defaults(func=run, interrupted=lambda a: "nothing complete was written; run the command again")
    return p


def run(args) -> int:
    from ..export import TRITON_MAX_BATCH, check_triton_options, export, write_triton_repository

    from ..model import check_recorded_tiling, config_from_checkpoint, load_checkpoint

    if args.max_batch_size is not None and not args.triton_repo:
        raise ValueError("--max-batch-size: only with --triton-repo (it is the server's setting)")
    max_batch = TRITON_MAX_BATCH if args.max_batch_size is None else args.max_batch_size
    if args.triton_repo:  # checked before anything is written
        check_triton_options(args.format, args.batch, max_batch)
    if args.tile_size is not None or args.tile_stride is not None:
        try:
            config = config_from_checkpoint(load_checkpoint(args.checkpoint))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--checkpoint: {e}") from None
        check_recorded_tiling(config, args.tile_size, args.tile_stride)
    path = export(args.checkpoint, args.out, args.format, batch=args.batch, sensitivity=args.sensitivity,
                  overwrite=args.overwrite, **given(device=args.device, dtype=args.dtype))
    print(f"exported: {path} (and model.json beside it)")
    if args.triton_repo:
        config = write_triton_repository(path, args.triton_repo, max_batch_size=max_batch)
        print(f"Triton Inference Server repository: {config.parent.parent} (tritonserver --model-repository "
              f"{config.parent.parent})")
    return 0
