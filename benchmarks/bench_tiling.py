"""Does tiling find the small defects that resizing misses, and what does a large image cost?

Two questions, one script:

1. **Evidence** (``--evidence``): on the synthetic high-resolution set
   (:func:`ckaad_fast.data.highres.make_highres_dataset`: texture photographs, 2048² by default,
   spots of 4-10 pixels with exact masks) one detector is trained twice, identically except for
   how an image reaches it: resized whole to the model's input, or cut into tiles at full
   resolution. Both are evaluated at the images' full resolution (the resized model's maps are
   enlarged to it, as ``eval`` does with masks the other way round): image AUROC, pixel AUROC,
   AUPRO. The seam check: :func:`ckaad_fast.tiling.seam_ratio` of the tiled model's stitched maps
   of the normal test images (the mean jump across tile borders over the mean step inside tiles;
   1 means no seam).
2. **Throughput** (always): the Scorer on one tiled image of 2048² (4.2 MP) and one of
   5472x3648 (20 MP), in megapixels per second, with the tiles' count, the batch of tiles, and
   the peak memory the call added (see :func:`benchmarks.common.peak_memory`).

Expected before measuring: resized whole, a 4-10 px spot at 2048 -> 128 becomes 0.25-0.6 px and
the image AUROC should sit near chance; tiled at full resolution it keeps its pixels, and both
AUROCs should be far higher. Throughput: the tiles' forwards dominate, so MP/s ~ (tiles/s of the
model at its input) x (stride² / 10^6); stitching adds one multiply-add per pixel per covering tile.

Run: ``python -m benchmarks.bench_tiling [--evidence] [--quick] [--device cuda]``. The columns
``auroc_top*``, ``auroc_local15_top10`` and ``px_above_defect_peak`` ask why the image decision of
a tiled model fails where its maps find the defects (docs/BENCHMARKS.md, "Small defects on large
images"); ``--tile 64 --stride 56 --input 128`` enlarges each tile twice. A tiled row's
``image_auroc`` is the library's default decision, the feature memory's since #36
(``--memory-candidates 0``: the top-k mean's, as ``auroc_top100``).

3. **Image rules** (``--n-calib N --maps-out DIR``, then ``--rules-from DIR/*.npz``): each run
   keeps its test maps and the maps of N normal images held apart; twenty image-decision rules
   (:data:`RULES`: the map as it is, blurred again or normalised per position, read by a top-k
   mean or by the region decision) are scored on the same maps and paired against top-100 (the
   default until the feature memory became a tiled model's decision) over the seeds (docs/BENCHMARKS.md, "The evidence on three sets"). Given the runs'
   sets too (``--data 'DIR/d_{category}_{seed}'``, as the evidence wrote them), two more: a memory
   of the training images' features looks up the map's 500 highest cells
   (:data:`MEMORY_RULES`, :mod:`ckaad_fast.feature_memory`).
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import peak_memory, print_table, save_rows
from ckaad_fast.data import FolderDataset, MVTecDataset
from ckaad_fast.data.highres import make_highres_dataset
from ckaad_fast.evaluation import metrics_from_predictions, predict_dataset
from ckaad_fast.model import Detector, ModelConfig
from ckaad_fast.scoring import Scorer
from ckaad_fast.tiling import seam_ratio


def _config(tiled: bool, args):
    from ckaad_fast.tiling import Tiling
    from ckaad_fast.training import TrainConfig

    tiles = dict(tile_size=args.tile, tile_stride=args.stride) if tiled else {}
    for name in ("memory_candidates", "memory_norm_cell"):
        if tiled and getattr(args, name, None) is not None:
            tiles[name] = getattr(args, name)
    # More steps for the resized model, which sees one input per image where the tiled model
    # sees every tile: as many steps as the tiled model's, up to 300 (its loss has flattened by then).
    per_image = Tiling(args.tile, args.stride).count(args.size, args.size)
    return TrainConfig(strategy=args.strategy, backbone="efficientnet_lite0", layers=tuple(args.layers), image_size=args.input,
                       epochs=args.epochs if tiled else min(args.epochs * per_image, 300), batch_size=2 if args.quick else 6,
                       ae_lr=5e-3, seed=args.seed, device=args.device, **tiles)


def evidence(args, root) -> list[dict]:
    from ckaad_fast.training import train

    rows = []
    for tiled in (False, True)[1 if args.tiles_only else 0:]:
        cfg = _config(tiled, args)
        mean, std = cfg.normalization()
        train_set = MVTecDataset(root, args.category, "train", cfg.source_size, mean, std)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result = train(cfg, train_set, out_dir=out, progress=False)
        train_s = time.perf_counter() - t0
        model = result.model.detector if hasattr(result.model, "detector") else result.model
        test_set = MVTecDataset(root, args.category, "test", None, mean, std)  # full resolution
        t0 = time.perf_counter()
        pred = _predict_full_resolution(model, test_set, cfg, args)
        score_s = time.perf_counter() - t0
        calib = None
        if tiled and args.n_calib:
            calib_set = FolderDataset(Path(root) / args.category, "good", split="calib", image_size=None, mean=mean, std=std)
            calib = predict_dataset(model, calib_set, batch_size=16, device=args.device, progress=False).maps
        if tiled and args.maps_out:
            Path(args.maps_out).mkdir(parents=True, exist_ok=True)
            np.savez(Path(args.maps_out) / f"maps_{args.category}_s{args.seed}_{cfg.strategy}.npz",
                     maps=pred.maps.astype(np.float32), labels=pred.labels, masks=pred.masks,
                     calib=calib if calib is not None else np.zeros((0,) + pred.maps.shape[1:], np.float32))
        metrics = metrics_from_predictions(pred)
        normal = pred.labels == 0
        seams = [seam_ratio(m, model.config.tiling) for m in pred.maps[normal]] if tiled else []
        rows.append({"input": "tiles" if tiled else "resized whole", "category": args.category, "strategy": cfg.strategy,
                     "seed": args.seed,
                     "layers": "".join(map(str, args.layers)),
                     "model_input": args.input,
                     "tile": f"{args.tile}/{args.stride}" if tiled else "-", "epochs": cfg.epochs,
                     "steps": sum(r["steps"] for r in result.history), "train_s": round(train_s, 1), "score_s": round(score_s, 1),
                     "image_auroc": round(100 * metrics["image_auroc"], 2),
                     "pixel_auroc": round(100 * metrics["pixel_auroc"], 2), "aupro": round(100 * metrics["aupro"], 2),
                     "seam_ratio": round(float(np.mean(seams)), 3) if seams else None, **image_rules(pred)})
    return rows


def image_rules(pred) -> dict:
    """Why an image decision fails where the maps find the defects: the image AUROC of other
    image-score rules on the same full-resolution maps (the mean of the top 1, 10, 100 and 1000
    values; the top 10 of the map minus its 15-pixel local mean, which removes broad normal
    variation), and how many pixels of its own image lie above each defect's peak (median)."""
    from scipy import ndimage

    from ckaad_fast.metrics import image_auroc

    out = {f"auroc_top{k}": round(100 * image_auroc(pred.labels, [_top(m, k) for m in pred.maps]), 1)
           for k in (1, 10, 100, 1000)}
    out["auroc_local15_top10"] = round(100 * image_auroc(
        pred.labels, [_top(m - ndimage.uniform_filter(m, 15), 10) for m in pred.maps]), 1)
    above = [int((m > m[mask > 0].max()).sum()) for m, mask, y in zip(pred.maps, pred.masks, pred.labels)
             if y == 1 and mask.any()]
    out["px_above_defect_peak"] = int(np.median(above)) if above else None
    return out


#: The image-decision rules compared on the same stitched maps (``--maps-out``, ``--rules-from``):
#: a map (as it is, blurred again, or normalised per position by the calibration normals' maps:
#: :mod:`ckaad_fast.map_norm`) read by a score (the mean of its k largest values, or the largest
#: excess mass among its regions at a pixel threshold at 1e-5 of the calibration normals' pixels:
#: :mod:`ckaad_fast.calibration.region_decision`). ``top100`` was the library's default before the
#: feature memory (and is with ``memory_candidates=0``), every other rule's twin.
MAP_VARIANTS = ("", "blur2_", "blur4_", "norm16_", "norm64_")
READERS = ("top100", "top10", "top1", "region")
#: Rules that also need the images (``--rules-from`` with ``--data``): the largest distance to a
#: memory of the training images' features among the 500 highest cells of the map as it is, or
#: of the map normalised by 16 px cells (:mod:`ckaad_fast.feature_memory`).
MEMORY_RULES = ("memory", "norm16_memory")
RULES = tuple(v + r for v in MAP_VARIANTS for r in READERS) + MEMORY_RULES


def _variant(name: str, maps, calib):
    """``maps`` (and ``calib``) as the map variant ``name`` of :data:`MAP_VARIANTS` makes them."""
    from scipy import ndimage

    from ckaad_fast.map_norm import fit_map_normalization

    if name.startswith("blur"):
        sigma = float(name[4:-1])
        return ([ndimage.gaussian_filter(m, sigma) for m in maps], [ndimage.gaussian_filter(m, sigma) for m in calib])
    if name.startswith("norm"):
        norm = fit_map_normalization(calib, int(name[4:-1]))
        return norm.apply(maps), norm.apply(calib)
    return maps, calib


def rule_scores(name: str, maps, calib) -> dict[str, list[float]]:
    """Each reader's image scores of the map variant ``name`` of ``maps`` (N, H, W); ``calib``:
    the maps of normal images kept apart (the normalisation's statistics and the region
    decision's pixel threshold come from them)."""
    from ckaad_fast.calibration.region_decision import calibrate_region_decision

    out = {f"{name}top{k}": [_top(m, k) for m in maps] for k in (100, 10, 1)}
    rule = calibrate_region_decision(calib, 0.05, pixel_fpr=1e-5)
    out[f"{name}region"] = [rule.score(m) for m in maps]
    return out


def rules_from_maps(paths, args) -> list[dict]:
    """One row per stored run (``--maps-out``'s .npz) and rule: the image AUROC of the rule on
    the run's test maps, and the pixel AUROC of the map variant it reads. With ``args.data`` (the
    runs' sets, ``{category}`` and ``{seed}`` filled in), the :data:`MEMORY_RULES` too."""
    from ckaad_fast.metrics import image_auroc, pixel_auroc

    rows = []
    for path in paths:
        d = np.load(path)
        if len(d["calib"]) < 2:
            raise SystemExit(f"{path}: no calibration normals' maps (run the evidence with --n-calib)")
        name = Path(path).stem.split("_")  # maps_<category>_s<seed>_<strategy>
        run = {"category": name[1], "seed": int(name[2][1:]), "strategy": "_".join(name[3:])}
        pixels = {}
        for variant in MAP_VARIANTS:
            maps, calib = _variant(variant, d["maps"], d["calib"])
            pixels[variant] = round(100 * pixel_auroc(d["masks"], np.asarray(maps)), 2)
            for rule, scores in rule_scores(variant, maps, calib).items():
                rows.append({**run, "rule": rule, "image_auroc": round(100 * image_auroc(d["labels"], scores), 2),
                             "pixel_auroc": pixels[variant]})
        if args.data:
            root = args.data.format(**run)
            for rule, scores in memory_scores(root, run["category"], d, args).items():
                rows.append({**run, "rule": rule, "image_auroc": round(100 * image_auroc(d["labels"], scores), 2),
                             "pixel_auroc": pixels[rule[:-len("memory")]]})
    return rows


def memory_scores(root, category: str, d, args) -> dict[str, list[float]]:
    """The :data:`MEMORY_RULES`' image scores of a stored run's test images (in ``root``): a
    memory of the training images' features (the backbone's ``args.layers``, enlarged as the
    tiles were, ``args.input / args.tile``), looked up at the 500 highest cells of each map and of
    each map normalised per position; each image's features are computed once for both."""
    from ckaad_fast.feature_memory import DEFAULT_CANDIDATES, FeatureMemory
    from ckaad_fast.map_norm import fit_map_normalization
    from ckaad_fast.models import build_backbone

    backbone = build_backbone("efficientnet_lite0", layers=args.layers)
    train = MVTecDataset(root, category, "train", None, backbone.mean, backbone.std)
    test = MVTecDataset(root, category, "test", None, backbone.mean, backbone.std)
    if list(test.labels) != list(d["labels"]):
        raise SystemExit(f"{root}: its test images are not the stored maps' (labels differ)")
    memory = FeatureMemory.fit(backbone, (train[i][0] for i in range(len(train))), args.input / args.tile)
    normalised = fit_map_normalization(d["calib"], 16).apply(d["maps"])
    out = {rule: [] for rule in MEMORY_RULES}
    for i in range(len(test)):
        feats = memory.features(backbone, test[i][0])
        cells = {rule: memory.candidates(feats, m[i], DEFAULT_CANDIDATES)
                 for rule, m in zip(MEMORY_RULES, (d["maps"], normalised))}
        union = torch.unique(torch.cat(list(cells.values())))
        dist = dict(zip(union.tolist(), memory.distances(feats, union).tolist()))
        for rule, idx in cells.items():
            out[rule].append(max(dist[j] for j in idx.tolist()))
    return out


def rules_summary(rows) -> list[dict]:
    """Per training strategy, per category (and over all of them) and rule: the image AUROC of
    each seed, the mean pixel AUROC of the map it reads, and the paired difference against
    ``top100`` over the seeds (mean, 95% t-interval; :mod:`ckaad_fast.experiments.paired`)."""
    out = []
    for strategy in sorted({r["strategy"] for r in rows}, key=lambda v: (v != "recon", v)):
        of_strategy = [r for r in rows if r["strategy"] == strategy]
        categories = sorted({r["category"] for r in of_strategy})
        for category in categories + (["all"] if len(categories) > 1 else []):
            out += _rules_of(strategy, category, of_strategy)
    return out


def _rules_of(strategy: str, category: str, rows: list[dict]) -> list[dict]:
    """:func:`rules_summary`'s rows of one strategy and category ("all": each seed's difference is
    the mean over the categories first, the experiment tables' rule, so the interval is over seeds)."""
    from ckaad_fast.experiments.paired import paired_difference

    mine = [dict(r, strategy=r["rule"]) for r in rows if category in ("all", r["category"])]
    out = []
    for rule in RULES:
        runs = sorted((r for r in mine if r["rule"] == rule), key=lambda r: r["seed"])
        if not runs:
            continue
        d = paired_difference(mine, rule, "image_auroc", baseline="top100") if rule != "top100" else None
        per_seed = [float(np.mean([r["image_auroc"] for r in runs if r["seed"] == seed]))
                    for seed in sorted({r["seed"] for r in runs})]
        interval = "" if d is None or d.low is None else f" ({d.low:+.1f} to {d.high:+.1f})"
        out.append({"category": category, "strategy": strategy, "rule": rule,
                    "image_auroc": " / ".join(f"{v:.1f}" for v in per_seed),
                    "mean": round(float(np.mean([r["image_auroc"] for r in runs])), 1),
                    "pixel_auroc": round(float(np.mean([r["pixel_auroc"] for r in runs])), 1),
                    "vs_top100": "-" if d is None else f"{d.mean:+.1f}{interval}"})
    return out


def _top(m, k: int) -> float:
    """The mean of the ``k`` largest values of a map (the image rules' top-k reader)."""
    f = np.asarray(m).ravel()
    return float(np.partition(f, f.size - k)[f.size - k:].mean())


def _predict_full_resolution(model, test_set, cfg, args):
    """Predictions whose maps are at the images' full resolution: a tiled model's own; the
    resized model's enlarged (bilinear) from its input to the image."""
    if cfg.tile_size is not None:
        return predict_dataset(model, test_set, batch_size=16, device=args.device, progress=False)
    mean, std = cfg.normalization()
    small = MVTecDataset(test_set.root, test_set.category, "test", cfg.image_size, mean, std)
    pred = predict_dataset(model, small, batch_size=16, device=args.device, progress=False)
    size = tuple(test_set[0][0].shape[-2:])
    pred.maps = F.interpolate(torch.from_numpy(pred.maps)[:, None], size=size, mode="bilinear",
                              align_corners=False)[:, 0].numpy()
    pred.masks = np.stack([test_set[i][2][0].numpy() > 0.5 for i in range(len(test_set))])
    return pred


def throughput(args, with_untiled: bool = False):
    """Rows of megapixels/s per engine and image size; with ``with_untiled``, also the seconds per
    image of the same model untiled, through the same (first) Scorer: ``(rows, seconds)``."""
    rows = []
    per_image = None
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Detector(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2, 3), image_size=(args.input,) * 2,
                                     tile_size=args.tile, tile_stride=args.stride), weights="none")
    sizes = [(256, 256)] if args.quick else [(2048, 2048), (3648, 5472)]
    for engine in (["torch"] if args.device != "cpu" or args.quick else ["torch", "openvino"]):
        try:
            dtype = "float32" if args.device == "cpu" else "bfloat16"
            scorer = Scorer(model, device=args.device, dtype=dtype, batch_size=args.batch, engine=engine)
        except Exception as e:  # noqa: BLE001 - an engine that is not installed is a row left out
            print(f"{engine}: not measured ({str(e).splitlines()[0]})")
            continue
        if with_untiled and per_image is None:
            untiled = Scorer(Detector(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2, 3),
                                                  image_size=(args.input,) * 2), weights="none"),
                             device=args.device, dtype=dtype, batch_size=args.batch, engine=engine)
            batch = untiled.normalise(torch.rand(args.batch, 3, args.input, args.input))
            untiled(batch)  # warm
            t0 = time.perf_counter()
            untiled(batch)
            if args.device != "cpu":
                torch.cuda.synchronize()
            per_image = (time.perf_counter() - t0) / args.batch
        for h, w in sizes:
            image = torch.rand(1, 3, h, w)
            x = scorer.normalise(image)
            scorer(x)  # warm
            times = []
            for _ in range(1 if args.quick else 3):
                t0 = time.perf_counter()
                scorer(x)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best = min(times)
            mib = peak_memory(lambda: scorer(x), args.device)
            rows.append({"engine": engine, "image": f"{w}x{h}", "megapixels": round(h * w / 1e6, 1),
                         "tiles": model.config.tiling.count(h, w), "tile": f"{args.tile}/{args.stride}",
                         "model_input": args.input, "batch": args.batch, "seconds": round(best, 3),
                         "mp_per_s": round(h * w / 1e6 / best, 2), "peak_mib": round(mib, 1)})
    return (rows, per_image) if with_untiled else rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evidence", action="store_true", help="also train and evaluate both models on the high-res set")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds: the tests run this so the script cannot rot")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--data", default=None, help="where the high-resolution set is written ({category} and {seed} are filled in; default: a "
                        "temporary folder); with --rules-from, where each run's set is (adds the memory rules)")
    p.add_argument("--category", default="brick",
                   help="the high-resolution set: a texture (brick, gravel, grass) or the aligned plate (default: brick)")
    p.add_argument("--size", type=int, default=2048, help="the set's image side in pixels (default: 2048)")
    p.add_argument("--input", type=int, default=128, help="the model's input side (default: 128)")
    p.add_argument("--tile", type=int, default=128, help="tile side at full resolution (default: 128)")
    p.add_argument("--stride", type=int, default=112, help="tile stride (default: 112)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs of each model (default: 4)")
    p.add_argument("--batch", type=int, default=32, help="tiles per forward when scoring (default: 32)")
    p.add_argument("--skip-throughput", action="store_true", help="only the evidence")
    p.add_argument("--memory-candidates", type=int, default=None, metavar="K",
                   help="the tiled model's image decision: its feature memory at K candidates (default: the "
                        "library's, 500); 0: the top-k mean")
    p.add_argument("--memory-norm-cell", type=int, default=None, metavar="PX",
                   help="with the memory, its cells picked from the map normalised per position by the training "
                        "images' maps in PX-pixel cells (default: the library's, none: the map as it is)")
    p.add_argument("--tiles-only", action="store_true", help="evidence of the tiled model only (no resized-whole model)")
    p.add_argument("--layers", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 3],
                   help="backbone layers, comma-separated (default: 1,2,3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set and of training (default: 0)")
    p.add_argument("--strategy", default="recon", choices=["recon", "recon_sub", "cka_patch", "cka_img", "gan"],
                   help="training strategy of the evidence models (default: recon); those with anomalies train "
                        "on elastic distortions of the training tiles, the paper's industrial protocol")
    p.add_argument("--n-train", type=int, default=6, help="normal training images of the set (default: 6)")
    p.add_argument("--n-test", type=int, default=8, help="normal and defective test images of the set, each (default: 8)")
    p.add_argument("--n-calib", type=int, default=0,
                   help="normal images kept for the statistics of normal maps and the calibration (default: 0)")
    p.add_argument("--maps-out", default=None, help="also write each tiled run's full-resolution maps here (.npz)")
    p.add_argument("--rules-from", nargs="+", default=None, metavar="NPZ",
                   help="no training: compare the image-decision rules on stored maps (--maps-out's files), "
                        "per run, and their paired differences against top100 per strategy and category")
    p.add_argument("--no-save", action="store_true", help="do not append the rows to benchmarks/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.input, args.tile, args.stride, args.epochs, args.batch = 256, 64, 64, 48, 1, 8
    if args.rules_from:
        rows = rules_from_maps(args.rules_from, args)
        save_rows("tiling_rules", rows, args, args.device)
        summary = rules_summary(rows)
        print_table("Image-decision rules on the same stitched maps: image AUROC per seed, paired difference "
                    "against top100 (mean, 95% t-interval)", list(summary[0]), [list(r.values()) for r in summary])
        return
    if not args.skip_throughput:
        rows = throughput(args)
        print_table("Tiled scoring throughput", list(rows[0]), [list(r.values()) for r in rows])
        save_rows("tiling_throughput", rows, args, args.device)
    if args.evidence:
        with tempfile.TemporaryDirectory() as tmp:
            where = args.data.format(category=args.category, seed=args.seed) if args.data else tmp
            root = make_highres_dataset(where, args.category, image_size=args.size, seed=args.seed,
                                        **({"n_train": 2, "n_test_good": 2, "n_test_defect": 2, "n_calib": min(args.n_calib, 2)} if args.quick else
                                           {"n_train": args.n_train, "n_test_good": args.n_test,
                                            "n_test_defect": args.n_test, "n_calib": args.n_calib}))
            ev = evidence(args, root)
        print_table("Tiles against the whole image resized (full-resolution metrics)", list(ev[0]),
                    [list(r.values()) for r in ev])
        save_rows("tiling_evidence", ev, args, args.device)


if __name__ == "__main__":
    main()
