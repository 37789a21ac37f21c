"""`ckaad-fast train` and `ckaad-fast eval`, end to end at 64 px, and their error messages."""
from __future__ import annotations

import json
import shutil

import pytest

from ckaad_fast.cli import main
from ckaad_fast.data.synthetic import make_texture_dataset

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

METRICS = ("image_auroc", "image_f1", "image_acc", "pixel_auroc", "aupro", "aupro_per_image")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_texture_dataset(tmp_path_factory.mktemp("tex"), "gravel", n_train=4, n_test_good=3,
                                n_test_defect=1, n_coarse=2, image_size=64, seed=0)


def tiny_train(root, out, *extra):
    return ["train", "--data", str(root), "--category", "gravel", "--backbone", "resnet18", "--layers", "1", "2",
            "--weights", "none", "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--out", str(out),
            "--quiet", *extra]


def test_train_then_eval(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_train(root, out, "--anomaly-dir", str(root / "gravel" / "coarse_anomalies"))) == 0
    assert (out / "checkpoint.pt").is_file()
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    capsys.readouterr()

    result = tmp_path / "metrics" / "m.json"
    chart = tmp_path / "metrics" / "by_defect.png"
    rc = main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(root), "--category", "gravel",
               "--batch-size", "4", "--json", str(result), "--chart", str(chart), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "pixel AUROC" in printed and f"chart written to {chart}" in printed
    from PIL import Image

    assert Image.open(chart).size[1] == 360  # the per-defect-type bars
    metrics = json.loads(result.read_text())
    for k in METRICS:
        assert 0.0 <= metrics[k] <= 1.0
    assert metrics["num_images"] == 3 + 4 and metrics["strategy"] == "cka_patch"


def test_resume_takes_the_configuration_from_the_checkpoint(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_train(root, out, "--strategy", "recon")) == 0
    # Only the new epoch count: backbone, layers, strategy ... come from the checkpoint.
    assert main(["train", "--data", str(root), "--category", "gravel", "--out", str(out), "--resume",
                 "--epochs", "2", "--eval", "--quiet"]) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "eval" in records[1] and records[1]["d_loss"] is None
    assert "pixel AUROC" in capsys.readouterr().out


def test_folder_layout(root, tmp_path, capsys):
    # Class folders made from the texture set: good vs. each defect type (no masks).
    data = tmp_path / "folders"
    for split in ("train", "test"):
        shutil.copytree(root / "gravel" / "test" / "good", data / split / "good")
        for d in ("scratch", "stain"):
            shutil.copytree(root / "gravel" / "test" / d, data / split / d)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--layout", "folder", "--normal-class", "good", "--ratio-labeled",
               "0.25", "--layers", "1", "2", "--weights", "none", "--image-size", "64", "--epochs", "1",
               "--batch-size", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "coarse" not in capsys.readouterr().err  # --quiet
    result = tmp_path / "m.json"
    rc = main(["eval", "--checkpoint", str(out), "--data", str(data), "--layout", "folder", "--normal-class", "good",
               "--json", str(result), "--quiet"])
    assert rc == 0
    metrics = json.loads(result.read_text())
    assert metrics["backbone"] == "resnet18"  # the paper's medical default for class folders
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and "pixel_auroc" not in metrics


@pytest.mark.parametrize(
    "args, option",
    [
        (["--epochs", "0"], "--epochs"),
        (["--layout", "coco"], "--layout"),
        (["--gamma", "2"], "--gamma"),
        (["--strategy", "vae"], "--strategy"),
        (["--layers", "5"], "--layers"),
    ],
)
def test_bad_train_arguments_exit_2(root, tmp_path, capsys, args, option):
    with pytest.raises(SystemExit) as e:
        main(tiny_train(root, tmp_path / "run", *args))
    assert e.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize(
    "make_args, option",
    [
        (lambda root, tmp: ["train", "--data", str(tmp / "missing"), "--category", "gravel", "--out", str(tmp)],
         "--data"),
        (lambda root, tmp: ["train", "--data", str(root), "--out", str(tmp)], "--category"),
        (lambda root, tmp: ["train", "--data", str(root), "--layout", "folder", "--out", str(tmp)], "--normal-class"),
        (lambda root, tmp: ["train", "--data", str(root), "--category", "gravel", "--out", str(tmp), "--amp", "fp16"],
         "--amp"),
        (lambda root, tmp: ["train", "--data", str(root), "--category", "gravel", "--out", str(tmp),
                            "--anomaly-dir", str(tmp / "nope")], "--anomaly-dir"),
        (lambda root, tmp: ["train", "--data", str(root), "--category", "gravel", "--out", str(tmp), "--resume"],
         "cannot resume"),
        (lambda root, tmp: ["eval", "--checkpoint", str(tmp / "none.pt"), "--data", str(root), "--category",
                            "gravel"], "--checkpoint"),
        (lambda root, tmp: ["eval", "--checkpoint", str(tmp / "bad.pt"), "--data", str(root), "--category",
                            "gravel"], "--checkpoint"),
    ],
)
def test_errors_are_one_clear_line(root, tmp_path, capsys, make_args, option):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(make_args(root, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckaad-fast ") and option in err[0]


def test_resume_keeps_eval_and_every_other_option_of_the_run(root, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_train(root, out, "--strategy", "recon", "--eval")) == 0
    # The resumed run names only the new epoch count: it evaluates again, as the original did.
    assert main(["train", "--data", str(root), "--category", "gravel", "--out", str(out), "--resume",
                 "--epochs", "2", "--quiet"]) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [("eval" in r) for r in records] == [True, True]
    # --no-eval turns it off for the rest of the run.
    assert main(["train", "--data", str(root), "--category", "gravel", "--out", str(out), "--resume",
                 "--epochs", "3", "--no-eval", "--quiet"]) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [("eval" in r) for r in records] == [True, True, False]


def test_train_protocol_and_eval_mask_resize_options(tmp_path):
    from ckaad_fast.cli import build_parser
    from ckaad_fast.cli.train import build_config

    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "o"),
                                      "--protocol", "reference"])
    assert build_config(args).protocol == "reference"
    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "o")])
    assert build_config(args).protocol == "ours"
    args = build_parser().parse_args(["eval", "--checkpoint", "c.pt", "--data", str(tmp_path), "--category", "x",
                                      "--mask-resize", "bilinear"])
    assert args.mask_resize == "bilinear"
