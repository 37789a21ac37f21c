"""Tests of ckaad_fast.data (files, images, layouts, coarse anomalies, pseudo anomalies, synthetic data)."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("skimage")

from ckaad_fast.data import (  # noqa: E402
    AnomalyFolderDataset,
    CoarseAnomalies,
    CorruptImageWarning,
    FolderDataset,
    MVTecDataset,
    PseudoAnomalyDataset,
    VisADataset,
    list_images,
    load_image,
    load_mask,
    sample_coarse_anomalies,
)
from ckaad_fast.models import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from trees import isic_tree as _isic_tree, jpg as _jpg  # noqa: E402
from ckaad_fast.data.synthetic import (  # noqa: E402
    DEFECT_TYPES,
    add_defect,
    load_texture,
    make_texture_dataset,
    render_normal,
)

SIZE = 64
N_TRAIN, N_GOOD, N_DEFECT, N_COARSE = 6, 3, 2, 4


@pytest.fixture(scope="module")
def texture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out = make_texture_dataset(
        root, "brick", n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT,
        n_coarse=N_COARSE, image_size=SIZE, seed=0,
    )
    return out


@pytest.fixture
def root_copy(texture_root, tmp_path):
    """A private copy that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(texture_root, dst)
    return dst


def _digest(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------
# synthetic generator
# ------------------------------------------------------------------------------------------


def test_synthetic_layout(texture_root):
    cat = texture_root / "brick"
    assert len(os.listdir(cat / "train" / "good")) == N_TRAIN
    assert len(os.listdir(cat / "test" / "good")) == N_GOOD
    for d in DEFECT_TYPES:
        assert len(os.listdir(cat / "test" / d)) == N_DEFECT
        assert sorted(os.listdir(cat / "ground_truth" / d)) == [f"{i:03d}_mask.png" for i in range(N_DEFECT)]
    coarse = sorted(os.listdir(cat / "coarse_anomalies"))
    assert len(coarse) == N_COARSE
    assert len({name.split("_")[0] for name in coarse}) == 1  # one defect type only
    with Image.open(cat / "train" / "good" / "000.png") as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert not [p for p in os.listdir(texture_root) if p.startswith(".")]  # no temp folders left


def test_synthetic_deterministic(tmp_path, texture_root):
    kw = dict(n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT, n_coarse=N_COARSE, image_size=SIZE)
    a = make_texture_dataset(tmp_path / "a", "brick", seed=0, **kw)
    assert _digest(a) == _digest(texture_root)
    b = make_texture_dataset(tmp_path / "b", "brick", seed=1, **kw)
    da, db = _digest(a), _digest(b)
    assert da.keys() == db.keys()
    assert da["brick/train/good/000.png"] != db["brick/train/good/000.png"]
    # same parameters again: reused; other parameters: refused unless overwrite
    assert make_texture_dataset(tmp_path / "a", "brick", seed=0, **kw) == a
    with pytest.raises(FileExistsError):
        make_texture_dataset(tmp_path / "a", "brick", seed=5, **kw)
    make_texture_dataset(tmp_path / "a", "brick", seed=1, overwrite=True, **kw)
    assert _digest(a) == db


@pytest.mark.parametrize("category", ["brick", "gravel", "grass"])
@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defects_have_exact_masks(category, kind):
    tex = load_texture(category)
    rng = np.random.default_rng(3)
    for hw in [(SIZE, SIZE), (40, 72)]:
        base = render_normal(tex, rng, hw, 256, category)
        img, mask = add_defect(base, kind, rng, tex, category)
        assert img.shape == base.shape == (*hw, 3) and mask.shape == hw and mask.dtype == bool
        assert mask.any()
        changed = np.any(np.rint(img) != np.rint(base), axis=2)
        assert not (changed & ~mask).any(), "a pixel outside the mask changed"
        # the defect is visible inside its mask
        assert np.abs(img - base)[mask].mean() > 10.0


# ------------------------------------------------------------------------------------------
# files and images
# ------------------------------------------------------------------------------------------


def test_list_images(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    names = ["d/b.PNG", "d/a.jpg", "d/sub/c.TIFF", "d/sub/e.bmp", "d/.hidden/x.png", "d/._y.png", "d/notes.txt"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    got = list_images(tmp_path / "d")
    assert got == sorted(str(tmp_path / n) for n in ["d/b.PNG", "d/a.jpg", "d/sub/c.TIFF", "d/sub/e.bmp"])
    assert list_images(tmp_path / "d", recursive=False) == sorted(str(tmp_path / n) for n in ["d/b.PNG", "d/a.jpg"])
    # files and folders mixed, de-duplicated
    assert list_images([tmp_path / "d" / "a.jpg", tmp_path / "d"]) == got
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an image"):
        list_images(tmp_path / "d" / "notes.txt")


def test_load_image_and_mask(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    raw = load_image(tmp_path / "x.png", (20, 30), mean=None, std=None)
    assert raw.shape == (3, 20, 30) and raw.dtype == torch.float32
    assert torch.allclose(raw, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    norm = load_image(tmp_path / "x.png", (20, 30))
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(norm, (raw - m) / s, atol=1e-6)
    assert load_image(tmp_path / "x.png", (8, 12)).shape == (3, 8, 12)
    # grayscale and 16-bit grayscale become 3 equal channels
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png", 16, mean=None, std=None)
    assert g.shape == (3, 16, 16) and torch.equal(g[0], g[1])
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "g16.png")
    g16 = load_image(tmp_path / "g16.png", (20, 30), mean=None, std=None)
    assert torch.allclose(g16[0], torch.from_numpy(rgb[..., 0]).float() / 255, atol=1e-5)
    # masks: any non-zero value is anomalous, nearest resize keeps them binary
    mk = np.zeros((20, 30), np.uint8)
    mk[5:10, 10:20] = 1
    Image.fromarray(mk).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (20, 30))
    assert mask.shape == (1, 20, 30) and torch.equal(mask[0], torch.from_numpy(mk).float())
    small = load_mask(tmp_path / "m.png", (10, 15))
    assert set(small.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(load_mask(None, (4, 5)), torch.zeros(1, 4, 5))


# ------------------------------------------------------------------------------------------
# MVTec layout
# ------------------------------------------------------------------------------------------


def test_mvtec_train_test(texture_root):
    train = MVTecDataset(texture_root, "brick", "train", image_size=SIZE)
    assert len(train) == N_TRAIN and train.labels == [0] * N_TRAIN and train.skipped == []
    img, label, mask, path = train[0]
    assert img.shape == (3, SIZE, SIZE) and label == 0 and mask.shape == (1, SIZE, SIZE) and not mask.any()
    assert path.endswith(os.path.join("train", "good", "000.png"))
    assert train.paths == sorted(train.paths)

    test = MVTecDataset(texture_root, "brick", "test", image_size=SIZE)
    assert len(test) == N_GOOD + N_DEFECT * len(DEFECT_TYPES)
    assert sum(test.labels) == N_DEFECT * len(DEFECT_TYPES)
    assert sorted(set(test.defect_types)) == sorted(["good", *DEFECT_TYPES])
    for i in range(len(test)):
        img, label, mask, path = test[i]
        assert label == int(test.defect_types[i] != "good")
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        if label:
            assert mask.sum() > 0
            # the mask read by the data set is the ground truth file, aligned with its image
            stem = os.path.splitext(os.path.basename(path))[0]
            gt = texture_root / "brick" / "ground_truth" / test.defect_types[i] / f"{stem}_mask.png"
            assert test.mask_paths[i] == str(gt)
            with Image.open(gt) as im:
                assert torch.equal(mask[0], torch.from_numpy(np.asarray(im) > 0).float())
        else:
            assert mask.sum() == 0 and test.mask_paths[i] is None
    batch = next(iter(torch.utils.data.DataLoader(test, batch_size=5)))
    assert batch[0].shape == (5, 3, SIZE, SIZE) and batch[2].shape == (5, 1, SIZE, SIZE) and len(batch[3]) == 5


def test_mvtec_defect_pixels_inside_mask(texture_root):
    """The generated defect shows in the data set's image where (and only roughly where) its mask is."""
    test = MVTecDataset(texture_root, "brick", "test", image_size=SIZE, mean=None, std=None)
    for i, kind in enumerate(test.defect_types):
        if kind in ("good", "patch"):
            continue
        img, _, mask, _ = test[i]
        m = mask[0].bool()
        # stains, holes and scratches change the colour; the normal texture around them does not look
        # like that: pixel colours inside the mask differ from the median colour outside it.
        med = img[:, ~m].median(dim=1).values.view(3, 1)
        assert (img[:, m] - med).abs().mean() > (img[:, ~m] - med).abs().mean()


def test_mvtec_non_square(texture_root):
    test = MVTecDataset(texture_root, "brick", "test", image_size=(48, 80))
    img, label, mask, _ = test[len(test) - 1]
    assert img.shape == (3, 48, 80) and mask.shape == (1, 48, 80) and label == 1 and mask.sum() > 0


def test_mvtec_corrupt_file_is_skipped(root_copy):
    bad = root_copy / "brick" / "train" / "good" / "zzz_corrupt.png"
    bad.write_bytes(b"\x89PNG this is not an image at all")
    with pytest.warns(CorruptImageWarning, match="zzz_corrupt.png"):
        ds = MVTecDataset(root_copy, "brick", "train", image_size=SIZE)
    assert ds.skipped == [str(bad)] and len(ds) == N_TRAIN
    for i in range(len(ds)):
        ds[i]
    # a truncated PNG and a corrupt mask are caught too
    good = root_copy / "brick" / "test" / "good" / "000.png"
    good.write_bytes(good.read_bytes()[:100])
    mask = root_copy / "brick" / "ground_truth" / "hole" / "001_mask.png"
    mask.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        test = MVTecDataset(root_copy, "brick", "test", image_size=SIZE)
    msgs = " ".join(str(w.message) for w in rec if issubclass(w.category, CorruptImageWarning))
    assert "000.png" in msgs and "001_mask.png" in msgs
    assert sorted(test.skipped) == sorted([str(good), str(root_copy / "brick" / "test" / "hole" / "001.png")])
    assert len(test) == N_GOOD + N_DEFECT * len(DEFECT_TYPES) - 2
    # a defect image without its mask is left out, with a warning naming it
    os.remove(root_copy / "brick" / "ground_truth" / "scratch" / "000_mask.png")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        test = MVTecDataset(root_copy, "brick", "test", image_size=SIZE)
    assert any("scratch/000.png" in str(w.message) and "no mask" in str(w.message) for w in rec)
    assert len(test) == N_GOOD + N_DEFECT * len(DEFECT_TYPES) - 3


def test_mvtec_layout_errors(root_copy, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)category 'nope' not found.*expected MVTec layout.*brick"):
        MVTecDataset(root_copy, "nope", "train")
    shutil.rmtree(root_copy / "brick" / "train" / "good")
    (root_copy / "brick" / "train" / "good").mkdir()
    with pytest.raises(ValueError, match=r"(?s)no images in .*good.*expected MVTec layout"):
        MVTecDataset(root_copy, "brick", "train")
    shutil.rmtree(root_copy / "brick" / "ground_truth" / "stain")
    with pytest.raises(ValueError, match=r"no mask folder .*stain"):
        MVTecDataset(root_copy, "brick", "test")
    with pytest.raises(ValueError, match="split"):
        MVTecDataset(root_copy, "brick", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not found"):
        MVTecDataset(tmp_path / "empty", "brick", "train")
    # a folder of nothing but unreadable files
    train = root_copy / "brick" / "train" / "good"
    (train / "a.png").write_bytes(b"junk")
    with pytest.warns(CorruptImageWarning), pytest.raises(ValueError, match="no readable images"):
        MVTecDataset(root_copy, "brick", "train")


# ------------------------------------------------------------------------------------------
# VisA and class-folder layouts
# ------------------------------------------------------------------------------------------


def _visa_from(texture_root, tmp_path):
    root = tmp_path / "visa"
    src = texture_root / "brick"
    rows = []
    for split, sub in [("train", "train/good"), ("test", "test/good")]:
        for f in sorted(os.listdir(src / sub))[:3]:
            dst = f"pcb1/Data/Images/Normal/{split}_{f.replace('.png', '.JPG')}"
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src / sub / f) as im:
                im.save(root / dst, format="JPEG")
            rows.append(["pcb1", split, "normal", dst, ""])
    for f in sorted(os.listdir(src / "test" / "stain")):
        dst = f"pcb1/Data/Images/Anomaly/{f.replace('.png', '.JPG')}"
        mdst = f"pcb1/Data/Masks/Anomaly/{f}"
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        (root / mdst).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src / "test" / "stain" / f) as im:
            im.save(root / dst, format="JPEG")
        # VisA masks hold 0/1 (or 0/255); either must come out binary
        with Image.open(src / "ground_truth" / "stain" / f.replace(".png", "_mask.png")) as im:
            m = (np.asarray(im) > 0).astype(np.uint8)
        Image.fromarray(m).save(root / mdst)
        rows.append(["pcb1", "test", "anomaly", dst, mdst])
    rows.append(["candle", "train", "normal", rows[0][3], ""])
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def test_visa(texture_root, tmp_path):
    root = _visa_from(texture_root, tmp_path)
    train = VisADataset(root, "pcb1", "train", image_size=(32, 40))
    assert len(train) == 3 and train.labels == [0, 0, 0]
    test = VisADataset(root, "pcb1", "test", image_size=(32, 40))
    assert len(test) == 3 + N_DEFECT and sum(test.labels) == N_DEFECT
    for i in range(len(test)):
        img, label, mask, path = test[i]
        assert img.shape == (3, 32, 40) and mask.shape == (1, 32, 40)
        assert (mask.sum() > 0) == bool(label)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"category 'nope' not in .*found objects \['candle', 'pcb1'\]"):
        VisADataset(root, "nope", "train")
    with pytest.raises(ValueError, match="split_csv/1cls.csv"):
        VisADataset(tmp_path, "pcb1", "train")
    with open(root / "split_csv" / "bad.csv", "w") as fh:
        fh.write("object,split,image\npcb1,train,x.png\n")
    with pytest.raises(ValueError, match=r"lacks columns \['label', 'mask'\]"):
        VisADataset(root, "pcb1", "train", csv_path=root / "split_csv" / "bad.csv")


def test_visa_defect_types_come_from_image_anno_csv(texture_root, tmp_path):
    from ckaad_fast.evaluation import defect_types_of

    root = _visa_from(texture_root, tmp_path)
    assert VisADataset(root, "pcb1", "test", image_size=32).defect_types is None  # no image_anno.csv
    with open(root / "split_csv" / "1cls.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["object"] == "pcb1"]
    anomalous = [r["image"] for r in rows if r["label"] == "anomaly"]
    with open(root / "pcb1" / "image_anno.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "mask"])
        for r in rows:
            if r["label"] == "normal":
                w.writerow([r["image"], "normal", ""])
        for i, img in enumerate(anomalous):
            w.writerow([img, "bent" if i == 0 else "melt, scratch", ""])
    test = VisADataset(root, "pcb1", "test", image_size=32)
    by_path = dict(zip(test.paths, test.defect_types))
    assert by_path[str(root / anomalous[0])] == "bent"
    assert {by_path[str(root / a)] for a in anomalous[1:]} == {"melt, scratch"}
    assert [t for t, lab in zip(test.defect_types, test.labels) if lab == 0] == ["good"] * 3
    assert defect_types_of(test) == test.defect_types


def _folder_from(texture_root, tmp_path, n_per_class=None):
    """Class folders: NORMAL from train/good, anomaly classes from the defect types (jpg, nested)."""
    root = tmp_path / "med"
    src = texture_root / "brick"
    for split in ["train", "test"]:
        for cls, sub in [("NORMAL", "train/good" if split == "train" else "test/good"), ("CNV", "test/stain"),
                         ("DME", "test/hole"), ("DRUSEN", "test/scratch")]:
            d = root / split / cls / "nested"
            d.mkdir(parents=True)
            for f in sorted(os.listdir(src / sub)):
                with Image.open(src / sub / f) as im:
                    im.convert("L").save(d / f.replace(".png", ".jpeg"), format="JPEG")
    return root


def test_folder_dataset(texture_root, tmp_path):
    root = _folder_from(texture_root, tmp_path)
    train = FolderDataset(root, "NORMAL", split="train", image_size=SIZE)
    assert len(train) == N_TRAIN and train.labels == [0] * N_TRAIN and train.num_normal == N_TRAIN
    assert sorted(train.paths_by_class) == ["CNV", "DME", "DRUSEN", "NORMAL"]
    img, label, path = train[0]
    assert img.shape == (3, SIZE, SIZE) and label == 0 and "NORMAL" in path
    test = FolderDataset(root, "NORMAL", split="test", image_size=(32, 48))
    assert len(test) == N_GOOD + 3 * N_DEFECT and sum(test.labels) == 3 * N_DEFECT
    assert test[0][0].shape == (3, 32, 48)
    only = FolderDataset(root, "NORMAL", anomaly_classes=["DME"], split="test")
    assert sorted(set(only.classes)) == ["DME", "NORMAL"] and sum(only.labels) == N_DEFECT
    with pytest.raises(ValueError, match=r"normal class folder 'HEALTHY' not found.*found classes"):
        FolderDataset(root, "HEALTHY")
    with pytest.raises(ValueError, match=r"anomaly classes \['XYZ'\] not found"):
        FolderDataset(root, "NORMAL", anomaly_classes=["XYZ"], split="test")
    with pytest.raises(ValueError, match="expected class-folder layout"):
        FolderDataset(tmp_path / "nothing", "NORMAL")


# ------------------------------------------------------------------------------------------
# coarse anomaly set
# ------------------------------------------------------------------------------------------


def _fake_classes():
    return {
        "normal": [f"n/{i:04d}.png" for i in range(950)],
        "a": [f"a/{i:04d}.png" for i in range(300)],
        "b": [f"b/{i:04d}.png" for i in range(40)],
        "c": [f"c/{i:04d}.png" for i in range(200)],
        "d": [f"d/{i:04d}.png" for i in range(200)],
    }


@pytest.mark.parametrize("r_l", [0.01, 0.02, 0.05])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_coarse_sampling_ratio_and_classes(r_l, k):
    by_class = _fake_classes()
    s = sample_coarse_anomalies(by_class, r_l, k, seed=7, normal_class="normal")
    assert isinstance(s, CoarseAnomalies)
    assert len(s.classes) == k and len(set(s.classes)) == k and "normal" not in s.classes
    expected = round(950 * r_l / (1 - r_l))
    pool = sum(len(by_class[c]) for c in s.classes)
    assert len(s) == min(expected, pool) and s.requested == expected
    # labelled anomalies are the fraction r_l of the training set (normal + labelled anomalies)
    assert abs(len(s) / (950 + len(s)) - r_l) < 1e-3 or len(s) == pool
    assert set(s.path_classes) <= set(s.classes)
    assert all(p.split("/")[0] == c for p, c in zip(s.paths, s.path_classes))
    assert len(set(s.paths)) == len(s.paths) and list(s.paths) == sorted(s.paths)
    # seeded and deterministic
    assert sample_coarse_anomalies(by_class, r_l, k, seed=7, normal_class="normal") == s


def test_coarse_sampling_seed_and_options():
    by_class = _fake_classes()
    draws = {sample_coarse_anomalies(by_class, 0.05, 2, seed=s, normal_class="normal").paths for s in range(6)}
    assert len(draws) > 1
    # the chosen classes vary with the seed too, and cover the candidates
    chosen = {c for s in range(30) for c in sample_coarse_anomalies(by_class, 0.02, 1, seed=s, normal_class="normal").classes}
    assert chosen == {"a", "b", "c", "d"}
    # explicit classes (the paper's k = 1 tables loop over every anomaly class)
    s = sample_coarse_anomalies(by_class, 0.02, seed=0, classes=["c"], normal_class="normal")
    assert s.classes == ("c",) and set(s.path_classes) == {"c"} and len(s) == round(950 * 0.02 / 0.98)
    # num_normal instead of a normal class
    assert len(sample_coarse_anomalies(by_class, 0.5, 1, seed=0, num_normal=10, classes=["a"])) == 10
    assert len(sample_coarse_anomalies(by_class, 0.0, 1, seed=0, normal_class="normal")) == 0
    with pytest.warns(UserWarning, match="only 40"):
        s = sample_coarse_anomalies(by_class, 0.2, seed=0, classes=["b"], normal_class="normal")
    assert len(s) == 40
    with pytest.raises(ValueError, match="num_classes"):
        sample_coarse_anomalies(by_class, 0.05, 5, normal_class="normal")
    with pytest.raises(ValueError, match="r_l"):
        sample_coarse_anomalies(by_class, 1.0, 1, normal_class="normal")
    with pytest.raises(ValueError, match="normal_class"):
        sample_coarse_anomalies(by_class, 0.05, 1)
    with pytest.raises(ValueError, match="distinct anomaly classes"):
        sample_coarse_anomalies(by_class, 0.05, classes=["normal"], normal_class="normal")


def test_coarse_sampling_from_folder_dataset(texture_root, tmp_path):
    root = _folder_from(texture_root, tmp_path)
    train = FolderDataset(root, "NORMAL", split="train", image_size=SIZE)
    s = sample_coarse_anomalies(train, 0.25, num_classes=2, seed=1)
    assert s.num_normal == N_TRAIN and len(s) == min(round(N_TRAIN * 0.25 / 0.75), 2 * N_DEFECT)
    assert len(s.classes) == 2 and set(s.classes) <= {"CNV", "DME", "DRUSEN"}
    assert sample_coarse_anomalies(train, 0.25, num_classes=2, seed=1) == s
    anomalies = AnomalyFolderDataset(s, image_size=SIZE)
    assert len(anomalies) == len(s) and anomalies.labels == [1] * len(s)
    img, label, path = anomalies[0]
    assert img.shape == (3, SIZE, SIZE) and label == 1 and path in s.paths


def test_anomaly_folder_dataset(texture_root, root_copy):
    ds = AnomalyFolderDataset(texture_root / "brick" / "coarse_anomalies", image_size=(32, 48))
    assert len(ds) == N_COARSE and ds.labels == [1] * N_COARSE
    img, label, _ = ds[0]
    assert img.shape == (3, 32, 48) and label == 1
    (root_copy / "brick" / "coarse_anomalies" / "broken.jpg").write_bytes(b"")
    with pytest.warns(CorruptImageWarning, match="broken.jpg"):
        ds = AnomalyFolderDataset(root_copy / "brick" / "coarse_anomalies")
    assert len(ds) == N_COARSE and len(ds.skipped) == 1
    empty = root_copy / "none"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        AnomalyFolderDataset(empty)


# ------------------------------------------------------------------------------------------
# pseudo anomalies
# ------------------------------------------------------------------------------------------


def test_pseudo_anomalies(texture_root):
    normal = MVTecDataset(texture_root, "brick", "train", image_size=SIZE)
    pseudo = PseudoAnomalyDataset(normal, alpha=200.0, seed=0)
    assert pseudo.sigma == 5.0 and len(pseudo) == len(normal)
    for i in range(3):
        x, label, path = pseudo[i]
        ref = normal[i][0]
        assert x.shape == ref.shape and label == 1 and path == normal.paths[i]
        assert not torch.allclose(x, ref) and (x - ref).abs().mean() > 0.05
        assert torch.isfinite(x).all()
    # reproducible for a seed and an epoch; new draws in a new epoch or with another seed
    a = pseudo[0][0]
    assert torch.equal(PseudoAnomalyDataset(normal, seed=0)[0][0], a)
    assert not torch.equal(PseudoAnomalyDataset(normal, seed=1)[0][0], a)
    pseudo.set_epoch(1)
    assert not torch.equal(pseudo[0][0], a)
    # the global torch RNG is left alone
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    pseudo[1]
    assert torch.equal(torch.rand(3), before)
    # pixels pulled in from outside are black before normalisation, as with the reference's PIL input
    raw = MVTecDataset(texture_root, "brick", "train", image_size=SIZE, mean=None, std=None)
    p_raw = PseudoAnomalyDataset(raw, alpha=2000.0, seed=0)[0][0]
    assert p_raw.min() >= 0.0 and (p_raw == 0).any()
    batch = next(iter(torch.utils.data.DataLoader(pseudo, batch_size=4)))
    assert batch[0].shape == (4, 3, SIZE, SIZE) and batch[1].tolist() == [1] * 4


def test_open_dataset_builds_each_layout_and_names_the_bad_argument(texture_root, tmp_path):
    from ckaad_fast.data import open_dataset
    from ckaad_fast.errors import ArgumentError

    ds = open_dataset("mvtec", texture_root, "test", SIZE, category="brick")
    assert isinstance(ds, MVTecDataset) and ds.split == "test" and ds.image_size == (SIZE, SIZE)
    med = _folder_from(texture_root, tmp_path)
    folder = open_dataset("folder", med, "test", SIZE, normal_class="NORMAL", anomaly_classes=["CNV"])
    assert isinstance(folder, FolderDataset) and folder.anomaly_classes == ["CNV"]
    cases = [
        (dict(layout="coco", root=texture_root, category="brick"), "layout"),
        (dict(layout="mvtec", root=tmp_path / "missing", category="brick"), "root"),
        (dict(layout="mvtec", root=texture_root), "category"),
        (dict(layout="mvtec", root=texture_root, category="nope"), "root"),
        (dict(layout="mvtec", root=texture_root, category="brick", normal_class="good"), "normal_class"),
        (dict(layout="folder", root=med), "normal_class"),
        (dict(layout="folder", root=med, normal_class="NORMAL", category="nope"), "category"),
    ]
    for kw, name in cases:
        layout, root = kw.pop("layout"), kw.pop("root")
        with pytest.raises(ArgumentError) as e:
            open_dataset(layout, root, "train", SIZE, **kw)
        assert e.value.name == name, (layout, kw, str(e.value))


def test_coarse_anomaly_set_follows_the_papers_protocols(texture_root, tmp_path):
    from ckaad_fast.data import coarse_anomaly_set
    from ckaad_fast.errors import ArgumentError

    med = _folder_from(texture_root, tmp_path)
    train = FolderDataset(med, "NORMAL", split="train", image_size=SIZE)
    # Class folders (the medical protocol): labelled anomalies drawn as sample_coarse_anomalies draws them.
    drawn = coarse_anomaly_set(train, ratio_labeled=0.25, num_classes=1, seed=3, image_size=SIZE)
    assert drawn.coarse == sample_coarse_anomalies(train, 0.25, 1, seed=3)
    assert drawn.paths == sorted(drawn.coarse.paths) and drawn.image_size == (SIZE, SIZE)
    # No ratio, or industrial data without a folder: None, i.e. pseudo-anomalies in train().
    assert coarse_anomaly_set(train, ratio_labeled=0.0) is None
    mvtec = MVTecDataset(texture_root, "brick", "train", SIZE)
    assert coarse_anomaly_set(mvtec, ratio_labeled=0.25) is None
    # A folder of anomalies wins over both.
    folder = coarse_anomaly_set(mvtec, anomaly_dir=texture_root / "brick" / "coarse_anomalies", image_size=SIZE)
    assert isinstance(folder, AnomalyFolderDataset) and folder.coarse is None and len(folder) == N_COARSE
    with pytest.raises(ArgumentError) as e:
        coarse_anomaly_set(mvtec, anomaly_dir=tmp_path / "missing")
    assert e.value.name == "anomaly_dir"
    with pytest.raises(ArgumentError) as e:
        coarse_anomaly_set(train, ratio_labeled=0.25, num_classes=9)
    assert e.value.name == "ratio_labeled" and "num_classes" in e.value.message


# -- the paper's medical layouts ---------------------------------------------------------------------
def test_isic2018_reads_its_csv_with_nv_normal(tmp_path):
    from ckaad_fast.data import ISIC2018Dataset, open_dataset

    _isic_tree(tmp_path, "Training", {f"ISIC_{i:07d}": c for i, c in
                                      enumerate(["NV"] * 6 + ["MEL", "MEL", "BCC", "DF"])})
    _isic_tree(tmp_path, "Validation", {f"ISIC_{100 + i:07d}": c for i, c in
                                        enumerate(["NV", "NV", "MEL", "VASC", "BKL"])})
    train = ISIC2018Dataset(tmp_path, "train", image_size=SIZE)
    assert len(train) == 6 and train.labels == [0] * 6 and train.normal_class == "NV"
    assert {c: len(p) for c, p in train.paths_by_class.items()} == {"NV": 6, "MEL": 2, "BCC": 1, "DF": 1}
    test = open_dataset("isic2018", tmp_path, "test", SIZE)
    assert sorted(zip(test.classes, test.labels)) == [("BKL", 1), ("MEL", 1), ("NV", 0), ("NV", 0), ("VASC", 1)]
    assert len(open_dataset("isic2018", tmp_path, "test", SIZE, anomaly_classes=["MEL"])) == 3
    # The medical protocol draws labelled anomalies from the training split's other classes.
    drawn = sample_coarse_anomalies(train, 0.25, classes=["MEL"], seed=0)
    assert len(drawn) == 2 and set(drawn.path_classes) == {"MEL"}


def test_isic2018_errors_name_what_is_wrong(tmp_path):
    from ckaad_fast.data import ISIC2018Dataset

    with pytest.raises(ValueError, match="ground-truth CSV"):
        ISIC2018Dataset(tmp_path, "train")
    _isic_tree(tmp_path, "Training", {"ISIC_1": "NV"})
    csv_file = tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv_file.write_text(csv_file.read_text().replace("VASC", "XYZ"))
    with pytest.raises(ValueError, match=r"unknown \['XYZ'\]"):
        ISIC2018Dataset(tmp_path, "train")
    _isic_tree(tmp_path, "Training", {"ISIC_1": "MEL"})
    with pytest.raises(ValueError, match="no image of the normal class NV"):
        ISIC2018Dataset(tmp_path, "train")


def test_br35h_splits_each_class_80_20_by_sorted_name(tmp_path):
    from ckaad_fast.data import Br35HDataset, open_dataset
    from ckaad_fast.errors import ArgumentError
    from ckaad_fast.training import resolve_config

    for cls, n in (("no", 10), ("yes", 5)):
        for i in reversed(range(n)):  # written out of order: the split must sort
            _jpg(tmp_path / cls / f"{cls[0]}{i:02d}.jpg", i)
    train = Br35HDataset(tmp_path, "train", image_size=SIZE)
    assert [os.path.basename(p) for p in train.paths] == [f"n{i:02d}.jpg" for i in range(8)]
    assert [os.path.basename(p) for p in train.paths_by_class["yes"]] == [f"y{i:02d}.jpg" for i in range(4)]
    test = open_dataset("br35h", tmp_path, "test", SIZE)
    assert sorted(os.path.basename(p) for p in test.paths) == ["n08.jpg", "n09.jpg", "y04.jpg"]
    assert sorted(test.labels) == [0, 0, 1]
    with pytest.raises(ArgumentError) as e:
        open_dataset("br35h", tmp_path, "test", SIZE, normal_class="no")
    assert e.value.name == "normal_class"
    (tmp_path / "yes2").mkdir()
    with pytest.raises(ValueError, match="class folder"):
        Br35HDataset(tmp_path / "yes2", "train")
    # Their domain's defaults, and ISIC's own: the image score is the whole map's mean.
    assert resolve_config(layout="br35h").backbone == "resnet18"
    assert resolve_config(layout="isic2018").topk is None
