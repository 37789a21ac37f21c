"""The paper's protocols and the experiment runner, on small generated trees that mimic the real
data sets: the validation split, the per-class runs and draws, the averaging, resumption, and
the `ckaad-fast experiment` command end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ckaad_fast.cli import main
from ckaad_fast.data import ISIC2018Dataset, carve_validation, list_categories, load_mask, sample_coarse_anomalies
from ckaad_fast.errors import ArgumentError
from ckaad_fast.experiments import Experiment, RunSpec, aggregate, class_draw, markdown, plan_experiment, run_experiment
from ckaad_fast.metrics import f1_acc_at
from trees import isic_tree

TINY = {"backbone": "resnet18", "weights": "none", "image_size": 64, "epochs": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def texture_root(tmp_path_factory):
    """The synthetic texture set in MVTec layout (the demo's data), small."""
    pytest.importorskip("skimage")
    from ckaad_fast.data.synthetic import make_texture_dataset

    return make_texture_dataset(tmp_path_factory.mktemp("synth"), "brick", n_train=16, n_test_good=6,
                                n_test_defect=2, n_coarse=4, image_size=64, seed=0)


@pytest.fixture
def isic(tmp_path):
    """ISIC 2018 task 3 as downloaded: 40 NV, 12 MEL, 8 BCC, 10 DF training images, a Validation split."""
    root = tmp_path / "ISIC2018"
    train = ["NV"] * 40 + ["MEL"] * 12 + ["BCC"] * 8 + ["DF"] * 10
    isic_tree(root, "Training", {f"ISIC_{i:07d}": c for i, c in enumerate(train)}, size=(32, 32))
    test = ["NV"] * 6 + ["MEL"] * 2 + ["BCC"] * 2 + ["DF"] * 2
    isic_tree(root, "Validation", {f"ISIC_{900 + i:07d}": c for i, c in enumerate(test)}, size=(32, 32))
    return root


# -- the validation split ---------------------------------------------------------------------------
def test_carve_validation_holds_out_the_authors_balanced_five_percent(isic):
    train = ISIC2018Dataset(isic, "train", image_size=32)
    rest, valid = carve_validation(train, seed=3)
    # v = min(int(40 * 0.05), int(30 * 0.05)) + 1 = min(2, 1) + 1 = 2 of each kind.
    assert sorted(valid.labels) == [0, 0, 1, 1] and len(valid) == 4
    assert len(rest) == 38 and rest.labels == [0] * 38
    held = set(valid.paths)
    assert not held & set(rest.paths)
    assert not held & {p for ps in rest.paths_by_class.values() for p in ps}
    assert sum(len(ps) for c, ps in rest.paths_by_class.items() if c != "NV") == 28
    assert {c for c, lab in zip(valid.classes, valid.labels) if lab == 0} == {"NV"}
    # Seeded: the same seed carves the same split, another seed another one.
    assert carve_validation(train, seed=3)[1].paths == valid.paths
    assert carve_validation(train, seed=4)[1].paths != valid.paths
    # The labelled anomalies come from what is left: never a validation image.
    drawn = sample_coarse_anomalies(rest, 0.05, classes=["MEL"], seed=0)
    assert len(drawn) == 2 and not set(drawn.paths) & held and set(drawn.path_classes) == {"MEL"}


def test_carve_validation_errors(tmp_path):
    root = tmp_path / "ISIC"
    isic_tree(root, "Training", {f"ISIC_{i}": "NV" for i in range(5)})
    with pytest.raises(ValueError, match="no anomalous images to hold out"):
        carve_validation(ISIC2018Dataset(root, "train", image_size=16))
    with pytest.raises(TypeError, match="class-labelled"):
        carve_validation([1, 2, 3])


# -- the plan -----------------------------------------------------------------------------------------
def test_table1_plans_one_run_per_anomaly_class_and_recon_once(isic):
    exp = Experiment("table1", "isic2018", str(isic), strategies=("recon", "cka_patch"), ratios=(0.0, 0.05),
                     seeds=(0, 1), settings=TINY)
    ids = [r.run_id for r in plan_experiment(exp)]
    per_seed = ["data__recon__rl0__none__seed{s}", "data__cka_patch__rl0__none__seed{s}",
                "data__cka_patch__rl0.05__BCC__seed{s}", "data__cka_patch__rl0.05__DF__seed{s}",
                "data__cka_patch__rl0.05__MEL__seed{s}"]
    assert ids == [i.format(s=s) for s in (0, 1) for i in per_seed]


def test_k_greater_than_one_uses_the_same_draws_everywhere(isic):
    exp = Experiment("table1", "isic2018", str(isic), strategies=("cka_patch", "gan"), ratios=(0.05,),
                     num_classes=2, draws=3, seeds=(0, 1))
    runs = plan_experiment(exp)
    assert len(runs) == 2 * 2 * 3
    draws = {(r.draw, r.anomaly_classes) for r in runs}
    assert len(draws) == 3 and all(len(c) == 2 for _, c in draws)
    assert all(class_draw(("BCC", "DF", "MEL"), 2, d) == c for d, c in draws)
    with pytest.raises(ArgumentError, match="k = 4"):
        plan_experiment(Experiment("table1", "isic2018", str(isic), num_classes=4))


def test_experiment_arguments_are_checked(tmp_path):
    with pytest.raises(ArgumentError) as e:
        Experiment("table1", "mvtec", str(tmp_path))
    assert e.value.name == "layout"
    with pytest.raises(ArgumentError) as e:
        Experiment("table2", "folder", str(tmp_path))
    assert e.value.name == "layout"
    with pytest.raises(ArgumentError) as e:
        Experiment("table3", "mvtec", str(tmp_path), seeds=(1, 1))
    assert e.value.name == "seeds"
    with pytest.raises(ArgumentError) as e:
        Experiment("table3", "mvtec", str(tmp_path), settings={"lr": 1})
    assert e.value.name == "settings"
    with pytest.raises(ValueError, match="strategy"):
        Experiment("table3", "mvtec", str(tmp_path), strategies=("nope",))


def test_list_categories(tmp_path):
    for c in ("bottle", "cable"):
        (tmp_path / c / "train" / "good").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    assert list_categories("mvtec", tmp_path) == ["bottle", "cable"]
    with pytest.raises(ArgumentError, match="no category folders"):
        list_categories("mvtec", tmp_path / "notes")


# -- the averaging ------------------------------------------------------------------------------------
def _row(seed, cls, auc, strategy="cka_patch", ratio=0.05):
    return {"run_id": f"{strategy}-{cls}-{seed}", "seed": seed, "strategy": strategy, "ratio_labeled": ratio,
            "anomaly_classes": [cls], "category": None, "image_auroc": auc, "image_f1": auc, "image_acc": auc,
            "image_f1_val": auc, "image_acc_val": auc}


def test_classes_are_averaged_within_a_seed_then_mean_and_std_over_seeds(tmp_path):
    rows = [_row(0, "A", 0.8), _row(0, "B", 0.6), _row(1, "A", 0.9), _row(1, "B", 0.7)]
    stats = aggregate(rows, lambda r: r["strategy"], ["image_auroc"])["cka_patch"]["image_auroc"]
    assert stats[0] == pytest.approx(0.75) and stats[1] == pytest.approx(np.std([0.7, 0.8], ddof=1)) and stats[2] == 2
    exp = Experiment("table1", "folder", str(tmp_path), strategies=("cka_patch",), ratios=(0.05,), seeds=(0, 1))
    md = markdown(exp, rows)
    assert "| 5% | CKAPatch | 75.00 ± 7.07 |" in md
    one_seed = markdown(exp, rows[:2])
    assert "| 5% | CKAPatch | 70.00 |" in one_seed


def test_f1_and_accuracy_at_a_fixed_threshold():
    labels, scores = [0, 0, 0, 1, 1], [0.1, 0.4, 0.6, 0.5, 0.9]
    f1, acc = f1_acc_at(labels, scores, 0.5)  # predicted: 0.6, 0.5, 0.9 -> tp 2, fp 1, fn 0
    assert f1 == pytest.approx(0.8) and acc == pytest.approx(0.8)
    assert f1_acc_at(labels, scores, 1.0) == (0.0, 0.6)
    with pytest.raises(ValueError):
        f1_acc_at(labels, scores, float("nan"))


# -- masks --------------------------------------------------------------------------------------------
def test_bilinear_mask_resize_drops_thin_regions_nearest_keeps_them(tmp_path):
    a = np.zeros((1024, 1024), np.uint8)
    a[2, :] = 255  # one pixel high: nearest (row 4i + 2 at 4x) keeps it, bilinear averages it away
    a[500:700, 500:700] = 255
    Image.fromarray(a).save(tmp_path / "m.png")
    nearest, bilinear = load_mask(tmp_path / "m.png", 256), load_mask(tmp_path / "m.png", 256, "bilinear")
    assert nearest[0, 0].sum() == 256 and bilinear[0, 0].sum() == 0
    assert torch.equal(nearest[0, 100:200], bilinear[0, 100:200])
    with pytest.raises(ValueError, match="mask resize"):
        load_mask(tmp_path / "m.png", 256, "bicubic")


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_table1_runs_end_to_end_and_resumes_without_redoing_runs(isic, tmp_path):
    out = tmp_path / "exp"
    exp = Experiment("table1", "isic2018", str(isic), strategies=("cka_patch",), ratios=(0.05,), settings=TINY,
                     seeds=(0,))
    rows = run_experiment(exp, out, progress=False)
    assert [r["anomaly_classes"] for r in rows] == [["BCC"], ["DF"], ["MEL"]]
    for r in rows:
        assert r["num_validation"] == 4 and r["num_train"] == 38 and r["num_labelled_anomalies"] == 2
        assert 0 <= r["image_f1_val"] <= 1 and 0 <= r["image_auroc"] <= 1
        seen = {t: t in r["anomaly_classes"] for t in r["by_defect_type"]}
        assert sum(seen.values()) == 1 and set(seen) == {"BCC", "DF", "MEL"}
    md = (out / "table.md").read_text()
    assert "| r_l | Strategy | AUC | F1 | ACC | F1 (val) | ACC (val) |" in md and "| 5% | CKAPatch |" in md
    assert len((out / "results.csv").read_text().splitlines()) == 4
    assert "seen" in (out / "by_defect_type.csv").read_text().splitlines()[0]
    # Again with one more seed: the three finished runs are kept, three new ones are made.
    before = (out / "results.jsonl").read_text()
    exp2 = Experiment("table1", "isic2018", str(isic), strategies=("cka_patch",), ratios=(0.05,), seeds=(0, 1),
                      settings=TINY)
    dry = run_experiment(exp2, out, dry_run=True)
    assert [d["done"] for d in dry] == [True] * 3 + [False] * 3
    rows2 = run_experiment(exp2, out, progress=False)
    assert len(rows2) == 6 and (out / "results.jsonl").read_text().startswith(before)
    assert " ± " in (out / "table.md").read_text()
    # Other settings in the same folder would mix two experiments in one table.
    with pytest.raises(ArgumentError, match="holds another experiment"):
        run_experiment(Experiment("table1", "isic2018", str(isic), settings={**TINY, "epochs": 2}, seeds=(0,)), out)
    # A crash that tore the last record: that run is made again, reported, and nothing is glued.
    ledger = out / "results.jsonl"
    text = ledger.read_bytes()
    ledger.write_bytes(text[: len(text) - 40])
    with pytest.warns(RuntimeWarning, match=r"results\.jsonl.*line 6: not a whole JSON record"):
        rows3 = run_experiment(exp2, out, progress=False)
    assert len(rows3) == 6 and [r["run_id"] for r in rows3] == [r["run_id"] for r in rows2]
    # The torn line is set aside (kept byte for byte), the ledger holds whole records only.
    assert (out / "results.jsonl.damaged").read_bytes() == text[: len(text) - 40].split(b"\n")[5] + b"\n"
    assert [json.loads(x)["run_id"] for x in ledger.read_text().splitlines()] == [r["run_id"] for r in rows2]
    # A second experiment on the same folder while one runs: refused, naming the first.
    from ckaad_fast.lock import FolderLock

    with FolderLock(out, what="ckaad-fast experiment"):
        with pytest.raises(FileExistsError, match="in use by another ckaad-fast experiment"):
            run_experiment(Experiment("table1", "isic2018", str(isic), strategies=("cka_patch",), ratios=(0.05,),
                                      seeds=(0, 1, 2), settings=TINY), out, progress=False)


@pytest.mark.slow
def test_cli_table3_on_the_synthetic_texture_set(texture_root, tmp_path, capsys):
    out = tmp_path / "t3"
    args = ["experiment", "table3", "--data", str(texture_root), "--epochs", "2", "--backbone", "resnet18",
            "--weights", "none", "--image-size", "64", "--batch-size", "8", "--seeds", "0", "1", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    md = capsys.readouterr().out
    for name in ("Recon", "ReconSub", "GAN", "CKAImg", "CKAPatch"):
        assert f"| {name} |" in md
    assert "## By defect type" in md and "| I-AUROC | P-AUROC | PRO (FPR≤0.3) | PRO (per image) |" in md
    # Each strategy against Recon, paired by seed, with its interval over the two seeds.
    paired = md.split("## Against Recon, paired by seed")[1].split("## By defect type")[0]
    assert all(f"| {name} | " in paired for name in ("ReconSub", "GAN", "CKAImg", "CKAPatch"))
    assert "| Recon | " not in paired and "] p=" in paired
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in lines] == ["cka_patch", "cka_img", "gan", "recon_sub", "recon"] * 2
    assert all(r["epochs"] == 2 and "aupro_per_image" in r and r["by_defect_type"] for r in lines)
    assert main(args[:-1] + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("done  ") == 10


def test_cli_experiment_errors_name_the_option(tmp_path, capsys):
    assert main(["experiment", "table1", "--data", str(tmp_path), "--layout", "mvtec", "--out", str(tmp_path / "o")]) == 2
    assert "--layout" in capsys.readouterr().err
    assert main(["experiment", "table2", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err


def test_run_spec_ids_are_folder_safe():
    spec = RunSpec("my cat", "cka_patch", 0.05, ("a/b",), 0, 2)
    assert spec.run_id == "my_cat__cka_patch__rl0.05__draw2-a_b__seed0"


# -- protocol="reference": the authors' loader and loss averaging ------------------------------------
def _anomaly_batches(protocol, n=6):
    from ckaad_fast.training import TrainConfig
    from ckaad_fast.training.loop import _EpochBatches

    cfg = TrainConfig(strategy="cka_patch", backbone="resnet18", weights="none", batch_size=4, protocol=protocol)
    normal = [(torch.zeros(3, 4, 4),) for _ in range(8)]
    anomalies = [(torch.full((3, 4, 4), float(i)),) for i in range(5)]
    _, it = _EpochBatches(cfg, normal, anomalies, world=1).loader(epoch=1)
    return [next(it)[:, 0, 0, 0].tolist() for _ in range(n)]


def test_reference_loader_keeps_the_short_batch_and_replays_one_shuffle():
    ours, theirs = _anomaly_batches("ours"), _anomaly_batches("reference")
    assert [len(b) for b in ours] == [4] * 6
    assert [len(b) for b in theirs] == [4, 1, 4, 1, 4, 1]
    assert theirs[2:4] == theirs[:2] and sorted(theirs[0] + theirs[1]) == [0, 1, 2, 3, 4]


def test_reference_protocol_averages_generated_terms_over_the_concatenated_batch():
    from ckaad_fast.training import CKAAD
    from ckaad_fast.strategies import FusedLosses
    from ckaad_fast.training import TrainConfig, Trainer

    class Recording(FusedLosses):
        def __init__(self):
            self.batches = []

        def generator(self, s_generated):
            self.batches.append(s_generated[0].shape[0])
            return super().generator(s_generated)

    seen = {}
    for protocol in ("ours", "reference"):
        cfg = TrainConfig(strategy="cka_patch", backbone="resnet18", weights="none", image_size=64, batch_size=4,
                          protocol=protocol)
        torch.manual_seed(0)
        rec = Recording()
        Trainer(CKAAD(cfg.model_config(), weights="none"), cfg, losses=rec).step(torch.randn(4, 3, 64, 64),
                                                                                torch.randn(1, 3, 64, 64))
        seen[protocol] = rec.batches
    # Ours: alpha = 0.5 of normal and anomalous inputs' reconstructions, two terms (4 and 1 images);
    # theirs: one mean over the five, so the single anomalous image weighs 1/5.
    assert seen == {"ours": [4, 1], "reference": [5]}


def _industrial_row(seed, category, auc, strategy="cka_patch"):
    return {"run_id": f"{category}-{strategy}-{seed}", "seed": seed, "strategy": strategy, "ratio_labeled": 0.0,
            "anomaly_classes": [], "category": category, "image_auroc": auc, "pixel_auroc": auc, "aupro": auc,
            "aupro_per_image": auc}


def test_table2_rows_are_categories_with_their_mean(tmp_path):
    rows = [_industrial_row(0, "bottle", 0.9), _industrial_row(0, "cable", 0.7),
            _industrial_row(1, "bottle", 1.0), _industrial_row(1, "cable", 0.8)]
    md = markdown(Experiment("table2", "mvtec", str(tmp_path), seeds=(0, 1)), rows)
    assert "| Category | I-AUROC | P-AUROC | PRO (FPR≤0.3) | PRO (per image) |" in md
    assert "| bottle | 95.00 ± 7.07 |" in md and "| cable | 75.00 ± 7.07 |" in md
    # The mean over the categories of each seed (0.8, 0.9), then over seeds.
    assert "| **Mean** | 85.00 ± 7.07 |" in md
    md3 = markdown(Experiment("table3", "mvtec", str(tmp_path), strategies=("cka_patch",)), rows[:2])
    assert "| CKAPatch | 80.00 | 80.00 | 80.00 | 80.00 |" in md3


def test_the_reference_protocol_reaches_the_training_and_the_masks(texture_root, monkeypatch):
    from ckaad_fast.experiments import single

    exp = Experiment("table3", "mvtec", str(texture_root), protocol="reference", settings=TINY)
    spec = RunSpec("brick", "cka_patch", 0.0, (), 5)
    cfg = single.run_config(exp, spec)
    assert (cfg.protocol, cfg.seed, cfg.strategy, cfg.epochs, cfg.eval_every) == ("reference", 5, "cka_patch", 1, 0)
    anomalies, test = single._anomalies(exp, spec, cfg), single._open(exp, spec, "test", cfg, None)
    assert anomalies is None and not exp.class_labelled and test.mask_resize == "bilinear"
    ours = Experiment("table3", "mvtec", str(texture_root), settings=TINY)
    assert single._open(ours, spec, "test", single.run_config(ours, spec), None).mask_resize == "nearest"


@pytest.mark.slow
def test_figure2_is_drawn_by_table1_with_k_above_one(isic, tmp_path):
    out = tmp_path / "fig"
    exp = Experiment("table1", "isic2018", str(isic), strategies=("recon", "cka_patch"), ratios=(0.05,),
                     num_classes=2, draws=1, seeds=(0,), settings=TINY)
    rows = run_experiment(exp, out, progress=False)
    assert [r["strategy"] for r in rows] == ["recon", "cka_patch"]
    picture = np.asarray(Image.open(out / "figure2.png").convert("RGB"))
    assert picture.shape[1] > 2 * picture.shape[0]  # two panels side by side: AUC and F1
    # Both strategies' bars (the chart's first two colours) in each panel.
    left, right = picture[:, : picture.shape[1] // 2], picture[:, picture.shape[1] // 2:]
    for panel in (left, right):
        for colour in ((0, 114, 178), (230, 159, 0)):
            assert (panel == colour).all(axis=-1).sum() > 50
    one = tmp_path / "one"  # k = 1: the table, no figure (Figure 2 is about k > 1)
    run_experiment(Experiment("table1", "isic2018", str(isic), strategies=("recon",), ratios=(0.05,), seeds=(0,),
                              settings=TINY), one, progress=False)
    assert not (one / "figure2.png").exists()
