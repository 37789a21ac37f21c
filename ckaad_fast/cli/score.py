"""``ckaad-fast score``: score a folder or a list of images with a trained checkpoint, or with a
folder written by ``ckaad-fast export``.

A thin layer over :class:`ckaad_fast.scoring.Scorer` (or, for an export folder,
:class:`ckaad_fast.scoring.deployed.DeployedScorer`, which never imports torch) and
:func:`ckaad_fast.scoring.score_to_folder`. Under ``torchrun --nproc_per_node N`` the images are
sharded over the N processes (one GPU each) and rank 0 merges their rows into the one OUT/scores.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap

from ..decisions import DEFAULT_SENSITIVITY
from ..runtime.plan import ENGINES
from ..scoring.results import MAP_FORMATS
from . import COMMANDS
from ._types import add_tiling_arguments, finite_float, nonneg_int, positive_int, precision_or_int8, unit_float


#: The exit code of a run that finished but could not score every image (see the error column).
EXIT_NOT_ALL_SCORED = 1


def _topk(text: str):
    if text == "mean":
        return "mean"
    return positive_int(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score",
        help=COMMANDS["score"],
        description=textwrap.fill(
            "Score a folder (searched recursively) or a list of image files with a trained CKAAD "
            "checkpoint, or with a folder written by ckaad-fast export (then PyTorch is never loaded: "
            "OpenVINO or ONNX Runtime run the graph, on the CPU). Writes OUT/scores.csv, one row per image in sorted path order, with the "
            "columns path, score, error (empty when the image was scored) and, with --threshold, "
            "is_anomalous; and, with --maps, one map per image under OUT/maps/. An image that "
            "cannot be read is reported in its row and the others are still scored. Files are "
            "written atomically, and scores.csv is rewritten every few seconds, so an interrupted "
            "run loses nothing it finished: re-run with --resume to score only what is missing.",
            width=88,
        ),
        epilog=(
            "examples:\n"
            "  ckaad-fast score --checkpoint runs/brick/checkpoint.pt --input photos/ --out results/\n"
            "  ckaad-fast score --checkpoint ckpt.pt --input a.png b.png --out res --maps png --threshold 0.6\n"
            "  ckaad-fast score --checkpoint exported/ --input photos/ --out res   # an export folder, no PyTorch\n"
            "  ckaad-fast score --checkpoint ckpt.pt --input photos/ --out res --device cuda --compile --cuda-graphs\n"
            "  torchrun --nproc_per_node 8 -m ckaad_fast score --checkpoint ckpt.pt --input photos/ --out res\n"
            "  nsys profile -t cuda,nvtx,osrt --trace-fork-before-exec=true --cuda-graph-trace=node \\\n"
            "      -o ckaad_scoring ckaad-fast score --checkpoint ckpt.pt --input photos/ --out res --device cuda --nvtx"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_io_arguments(p)
    _add_engine_arguments(p)
    _add_run_arguments(p)
    p.set_defaults(func=run, interrupted=lambda a: f"every image scored so far is kept in {os.path.join(a.out, 'scores.csv')}; run the same command with --resume to score the rest")
    add_tiling_arguments(p, sets=False)
    return p


def _add_io_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT_OR_EXPORT_DIR",
                   help="a checkpoint written by ckaad-fast train (or ckaad_fast.model.save_checkpoint), "
                        "loaded with torch.load(weights_only=True), so a file holding arbitrary Python "
                        "objects is refused; or a folder written by ckaad-fast export (onnx or openvino), "
                        "scored without PyTorch with the decisions of the checkpoint it was exported from "
                        "(--engine picks the runtime; the options of PyTorch's forward are refused)")
    p.add_argument("--input", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="one or more folders (searched recursively for .png, .jpg, .jpeg, .bmp, .tif, "
                        ".tiff; hidden files skipped) and/or image files")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created): OUT/scores.csv and OUT/maps/")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per batch (default: 16)")
    p.add_argument("--maps", choices=MAP_FORMATS, default=MAP_FORMATS[0],
                   help="anomaly maps to write under OUT/maps/, named after each image's path relative "
                        "to the deepest folder holding all inputs: none (default); npy: the float32 map "
                        "at the model's input size; png: a heat-map overlay on the image (Turbo colours, "
                        "blue = low, red = high, one colour range for every image: see --map-range)")
    p.add_argument("--map-range", type=finite_float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="colour range of the PNG overlays (LO dark blue, HI dark red). Default: the "
                        "minimum and maximum of the first batch's maps, or the range an earlier run "
                        "saved in OUT/maps/colour_scale.json when resuming; the range used is saved there")
    p.add_argument("--topk", type=_topk, default=None, metavar="K",
                   help="image score = mean of the K largest map values ('mean': the whole map's mean); "
                        "default: the checkpoint's")
    p.add_argument("--threshold", type=finite_float, default=None, metavar="T",
                   help="add the column is_anomalous (True when the raw score >= T); wins over a calibrated "
                        "checkpoint's decision")
    p.add_argument("--sensitivity", type=unit_float, default=None, metavar="S",
                   help="a calibrated checkpoint's decision (ckaad-fast calibrate): is_anomalous when "
                        "normalized_score >= 1 - S; "
                        f"{DEFAULT_SENSITIVITY} (default) is the calibrated threshold, higher flags more")
    p.add_argument("--regions", action=argparse.BooleanOptionalAction, default=None,
                   help="each image's defect regions at the calibrated pixel threshold (8-connected; box, area, "
                        "peak and mean score) in the rows' regions column and OUT/regions.json, and as boxes on the "
                        "PNG overlays (default: on where the checkpoint's calibration has a pixel threshold; on a GPU only with "
                        "--maps or --masks, since every map is read back for them)")
    p.add_argument("--masks", choices=("none", "png"), default=None,
                   help="png: each image's binary mask (map >= the calibrated pixel threshold, 0/255) as "
                        "OUT/masks/<name>.png; needs a checkpoint calibrated on a set with masks (default: none)")


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", type=precision_or_int8, default=None, metavar="auto|float32|bfloat16|float16|int8",
                   help="precision of the backbone and auto-encoder. Default: a calibrated checkpoint's own "
                        "(the precision ckaad-fast calibrate scored in, float32 unless told otherwise), so that "
                        "its decisions are the calibration's; an uncalibrated one's: auto. auto is bfloat16 "
                        "(autocast) on a GPU and on a CPU with AMX or AVX-512 BF16 units (about 3x faster there; "
                        "scores move by about 1e-3 relative, up to 3e-2), float32 on other CPUs. Another "
                        "precision than the calibration's is allowed, with a warning: decisions near the "
                        "threshold can then differ. int8: the quantized graph of a checkpoint calibrated with "
                        "calibrate --dtype int8 (run by openvino; that checkpoint's default). Recorded in "
                        "OUT/run.json; --resume refuses a change. Maps and scores are always computed in float32")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="who runs the forward. Default: a calibrated checkpoint's own (the engine ckaad-fast "
                        "calibrate scored with: the fastest installed one on its machine), torch for an "
                        "uncalibrated one. torch: PyTorch with the fused ops (the GPU path; --compile and "
                        "--cuda-graphs are its options); openvino, onnxruntime: the exported graph on the CPU "
                        "(float32; openvino also bfloat16), exported once and cached; auto: torch on a GPU, else "
                        "openvino, else onnxruntime, else torch, the order of the CPU benchmark. Recorded in "
                        "OUT/run.json; --resume refuses a change")
    p.add_argument("--compile", action="store_true",
                   help="build the forward with torch.compile (a one-off compilation of a minute or more; "
                        "worth it for large runs)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the forward into a CUDA graph (GPU only; the last, short batch is padded "
                        "and its padding never reaches the results)")
    p.add_argument("--num-workers", type=nonneg_int, default=None, metavar="N",
                   help="image-decoding worker processes (default: from the CPU count; 0 decodes in the "
                        "main process)")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="keep the scored rows of an existing OUT/scores.csv (whose map exists, when maps "
                        "are asked for) and of the OUT/parts/ an interrupted torchrun run left, and score "
                        "the rest (with any number of processes); rows with an error are retried")
    p.add_argument("--adopt-rows", action="store_true",
                   help="with --resume, when OUT holds rows but no run.json (an older ckaad_fast, or a folder "
                        "copied without it): declare that they were made by this checkpoint with these options, "
                        "keep them and score the rest; run.json records the declaration. Without it such a "
                        "resume is refused, since nothing else tells two models' rows apart")
    p.add_argument("--overwrite", action="store_true",
                   help="score everything again even though OUT/scores.csv exists")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="write a torch.profiler trace of a few batches (after the first, which warms up) "
                        "to DIR/trace.json (DIR/rank{R}/trace.json under torchrun), to open in "
                        "chrome://tracing or https://ui.perfetto.dev; works on the CPU too")
    p.add_argument("--nvtx", action="store_true",
                   help="emit NVTX ranges (domain ckaad_fast: decode, copy, forward, backbone, auto-encoder, "
                        "error map, upsample+blur, top-k, readback) for Nsight Systems; same as "
                        "CKAAD_FAST_NVTX=1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    if args.adopt_rows and not args.resume:
        raise ValueError("--adopt-rows: only with --resume")
    from ..scoring.deployed import is_export_folder

    if is_export_folder(args.checkpoint):  # before anything imports torch
        return _run_export(args)
    from ..distributed import distributed_session
    from ..runtime.plan import device_name

    device = device_name("score", args.device)
    # Under torchrun: join the process group (NCCL on GPUs, gloo on the CPU); else nothing.
    with distributed_session(device) as dist_info:
        return _run(args, device, dist_info)


#: What an export folder cannot honour (the graph is fixed, and run on the CPU), and why.
_NOT_FOR_EXPORTS = {
    "compile": "torch.compile builds PyTorch's forward",
    "cuda_graphs": "CUDA graphs capture PyTorch's forward",
    "profile": "the profiler traces PyTorch",
    "nvtx": "the NVTX ranges are PyTorch's stages",
    "num_workers": "images are decoded in the scoring process",
    "dtype": "the graph has the precision it was exported in",
    "topk": "the top-k is the exported model's",
    "tile_size": "the tiling is the exported model's",
    "tile_stride": "the tiling is the exported model's",
}


def _run_export(args) -> int:
    """``score`` with a folder written by ``ckaad-fast export``: the same results folder, without
    PyTorch (:class:`~ckaad_fast.scoring.deployed.DeployedScorer`)."""
    from ..data.files import list_images
    from ..errors import ArgumentError
    from ..scoring.deployed import DeployedScorer
    from ..scoring.results import check_out
    from ..scoring.runner import score_to_folder
    from . import flag

    for name, why in _NOT_FOR_EXPORTS.items():
        if getattr(args, name) not in (None, False):
            raise ValueError(f"{flag(name)}: not for an export folder ({why}); give the checkpoint instead")
    if args.device not in (None, "cpu"):
        raise ValueError("--device: an export folder runs on the CPU (OpenVINO or ONNX Runtime)")
    if args.engine == "torch":
        raise ValueError("--engine: an export folder is run by openvino or onnxruntime; torch needs the checkpoint")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--checkpoint: an export folder is scored by one process; run it without torchrun")
    paths = list_images(args.input, exclude=[args.out])
    check_out(args.out, args.resume, args.overwrite)  # before the graph is compiled: fail fast
    try:
        scorer = DeployedScorer(args.checkpoint, runtime=None if args.engine in (None, "auto") else args.engine,
                                batch_size=args.batch_size)
    except ArgumentError:
        raise  # named already (the runtime: --engine)
    except (ValueError, OSError) as e:
        raise ValueError(f"--checkpoint: {e}") from None
    if args.sensitivity is not None and scorer.calibration is None:
        raise ValueError("--sensitivity moves a calibrated decision, and this export holds none: export a "
                         "calibrated checkpoint, or give a raw --threshold")
    if args.sensitivity is None and scorer.sensitivity not in (None, DEFAULT_SENSITIVITY):
        args.sensitivity = scorer.sensitivity  # the export's (export --sensitivity): the graph's own decisions
    if args.adopt_rows:
        _adopt(args, scorer, "export")
    progress = not args.no_progress
    if progress:
        print(f"{len(paths)} images; {scorer}", file=sys.stderr)
    with _os_errors_as_clear_lines(args.out):
        summary = score_to_folder(scorer, paths, args.out, progress=progress, distributed=False, **_folder_options(args))
    _report(args, summary, None)
    return EXIT_NOT_ALL_SCORED if summary.failed else 0


def _run(args, device, dist_info) -> int:
    from ..data import list_images
    from ..distributed import local_device
    from ..profiling import enable_nvtx, torch_profiler
    from ..scoring import check_out, score_to_folder

    if args.nvtx:
        enable_nvtx(True)
    main = dist_info.is_main
    # Sorted; ValueError for a missing path or an empty folder. A results folder inside the input is
    # not searched: its overlays are not images to score.
    paths = list_images(args.input, exclude=[args.out])
    if main:
        check_out(args.out, args.resume, args.overwrite)  # before the model is loaded: fail fast
    scorer = _scorer(args, local_device(device))  # cuda:LOCAL_RANK under torchrun
    if args.sensitivity is not None and scorer.calibration is None:
        raise ValueError("--sensitivity moves a calibrated decision, and this checkpoint holds none: run "
                         "ckaad-fast calibrate first, or give a raw --threshold")
    if args.adopt_rows and main:
        _adopt(args, scorer, "checkpoint")
    progress = not args.no_progress and main
    if progress:
        procs = f" over {dist_info.world_size} processes" if dist_info.distributed else ""
        print(f"{len(paths)} images{procs}; {scorer}", file=sys.stderr)

    prof = None
    on_batch = None
    if args.profile:
        n_batches = -(-len(paths) // (args.batch_size * dist_info.world_size))
        trace_dir = os.path.join(args.profile, f"rank{dist_info.rank}") if dist_info.distributed else args.profile
        prof = torch_profiler(trace_dir, n_batches, cuda=scorer.device.type == "cuda")
        on_batch = prof.step

    with prof if prof is not None else contextlib.nullcontext(), _os_errors_as_clear_lines(args.out):
        summary = score_to_folder(scorer, paths, args.out, progress=progress, on_batch=on_batch, **_folder_options(args))
    if not main:
        return 0
    _report(args, summary, dist_info)
    return EXIT_NOT_ALL_SCORED if summary.failed else 0


def _folder_options(args) -> dict:
    """The results folder's options, as ``score_to_folder`` takes them (a checkpoint's run and an
    export folder's alike)."""
    return dict(maps=args.maps, threshold=args.threshold, sensitivity=args.sensitivity, masks=args.masks == "png",
                regions=args.regions, resume=args.resume, overwrite=args.overwrite,
                map_range=tuple(args.map_range) if args.map_range else None)


def _adopt(args, scorer, what: str) -> None:
    from ..scoring.runner import adopt_results

    n = adopt_results(scorer, args.out)
    print(f"adopted {n} rows in {args.out} as this {what}'s (recorded in run.json)", file=sys.stderr)


def _scorer(args, device):
    """The Scorer of the checkpoint, with its calibration; checkpoint errors name --checkpoint."""
    from ..model import check_recorded_tiling, config_from_checkpoint, load_checkpoint
    from ..scoring import Scorer

    try:
        ckpt = load_checkpoint(args.checkpoint)
        config = config_from_checkpoint(ckpt)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--checkpoint: {e}") from None
    check_recorded_tiling(config, args.tile_size, args.tile_stride)
    # From the checkpoint: a runtime engine whose graph is at hand runs without building the
    # PyTorch network (Scorer.from_checkpoint); its errors name --checkpoint.
    return Scorer.from_checkpoint(ckpt, device=device, dtype=args.dtype, compile=args.compile,
                                  cuda_graphs=args.cuda_graphs, batch_size=args.batch_size,
                                  num_workers=args.num_workers, topk=args.topk, engine=args.engine)


def _report(args, summary, dist_info) -> None:
    done = summary.scored + summary.failed
    msg = f"scored {summary.scored} of {done} images"
    if summary.skipped:
        msg += f" ({summary.skipped} already done, skipped)"
    if done:
        msg += f" in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s)"
    if summary.anomalous is not None:
        rule = (f"threshold {args.threshold:g}" if args.threshold is not None
                else "the calibrated threshold" if args.sensitivity is None
                else f"the calibrated threshold moved to sensitivity {args.sensitivity:g}")
        msg += f"; {summary.anomalous} anomalous at {rule}"
    print(msg, file=sys.stderr)
    test = (summary.monitor or {}).get("test")
    if test is not None:
        print(f"calibration's promise: {test['flagged']} of {test['images']} flagged where about "
              f"{test['expected']:.1f} normal images would be (p = {test['p_value']:.2g}"
              f"{', significant: see the warning' if test['significant'] else ''}; run.json: monitor)",
              file=sys.stderr)
    if summary.failed:
        print(f"{summary.failed} image(s) could not be scored: see the error column, e.g. "
              f"{summary.errors[0][0]!r}: {summary.errors[0][1]}", file=sys.stderr)
    print(f"results: {summary.csv_path}", file=sys.stderr)
    if args.profile:
        where = os.path.join(args.profile, "rank*" if dist_info.distributed else "", "trace.json")
        print(f"profiler trace: {where}", file=sys.stderr)


class _os_errors_as_clear_lines:
    """A disk full, a read-only or unwritable OUT, ...: one clear line (through the dispatcher),
    not a traceback. What was scored before is already in scores.csv where it could be written."""

    def __init__(self, out: str):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, FileExistsError)):
            raise RuntimeError(f"cannot write the results under {self.out!r}: {type(exc).__name__}: {exc}") from None
        return False

