"""ckaad-fast score as a production line runs it, on the folders and mistakes real operators make:
names that are not UTF-8 or look like formulas, link loops, NaN images and models, two runs on
one folder, resumes with another model or another spelling of the paths, colliding map names,
the results folder inside the input, bad checkpoints, full disks, a killed run. Every test reads
scores.csv, not only the exit code."""
from __future__ import annotations

import csv
import errno
import json
import io
import os
import urllib.parse
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ckaad_fast.cli import main
from ckaad_fast.model import ModelConfig, load_checkpoint, save_checkpoint
from ckaad_fast.training import CKAAD
from ckaad_fast.scoring import read_scores_csv
from ckaad_fast.lock import LOCK_NAME
from helpers import tiny_checkpoint  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")]

SIZE = 32
NOT_ALL = 1  # exit code: the run finished, some image could not be scored
ERROR = 2  # exit code: nothing (or not all) was done, one line says why


def tiny(seed=0, **kw) -> CKAAD:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=SIZE, topk=10, strategy="recon",
                          **kw)
        return CKAAD(cfg, weights="none").eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny())
    return path


def png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path,
                                                                                                          format="PNG")
    return path


def score(ckpt, inputs, out, *extra):
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
    return main(["score", "--checkpoint", str(ckpt), "--input", *map(str, inputs), "--out", str(out),
                 "--batch-size", "2", "--num-workers", "0", "--no-progress", *extra])


def rows_of(out):
    return read_scores_csv(out / "scores.csv")


# -- 1. names ------------------------------------------------------------------------------------
def test_a_name_that_is_not_utf8_is_scored_kept_and_resumed(ckpt, tmp_path):
    root = tmp_path / "in"
    png(root / "good.png")
    raw = os.fsencode(str(root)) + b"/caf\xe9.png"  # Latin-1 bytes: not valid UTF-8
    os.rename(png(root / "tmp.png", 1), raw)
    out = tmp_path / "out"
    assert score(ckpt, root, out) == 0
    rows = rows_of(out)
    assert len(rows) == 2 and all(r["score"] and not r["error"] for r in rows)
    assert os.fsencode(rows[0]["path"]) == raw  # the exact bytes come back
    # The file itself is valid UTF-8 (common readers need it); the name is percent-encoded bytes
    # behind the documented mark, readable by any CSV reader and decodable without ckaad_fast.
    text = (out / "scores.csv").read_bytes().decode("utf-8")
    cells = [r["path"] for r in csv.DictReader(io.StringIO(text))]
    assert cells[0].startswith("'%") and cells[0].endswith("/caf%E9.png")
    assert urllib.parse.unquote_to_bytes(cells[0][2:]) == raw
    assert score(ckpt, root, out, "--resume") == 0
    assert len(rows_of(out)) == 2  # matched, not scored again


def test_an_error_row_naming_a_non_utf8_file_keeps_the_csv_valid(ckpt, tmp_path):
    root = tmp_path / "in"
    png(root / "good.png")
    raw = os.fsencode(str(root)) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    assert score(ckpt, root, out) == 1  # an image could not be scored
    (out / "scores.csv").read_bytes().decode("utf-8")  # valid UTF-8
    bad = [r for r in rows_of(out) if r["error"]]
    assert len(bad) == 1 and os.fsencode(bad[0]["path"]) == raw


def test_formula_like_names_are_neutralised_and_read_back(ckpt, tmp_path):
    root = tmp_path / "in"
    names = ["=cmd.png", "+sum.png", "-neg.png", "@at.png", "'quoted.png", "plain.png"]
    for i, n in enumerate(names):
        png(root / n, i)
    out = tmp_path / "out"
    assert score(ckpt, root, out) == 0
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        cells = [r["path"] for r in csv.DictReader(f)]
    for cell in cells:
        base = os.path.basename(cell)
        # No cell starts with a character a spreadsheet would evaluate (an absolute path starts with /;
        # a relative one is checked by escape_cell's own test below).
        assert not cell.startswith(("=", "+", "-", "@"))
        assert base in names
    assert sorted(os.path.basename(r["path"]) for r in rows_of(out)) == sorted(names)


def test_escape_cell_round_trips_and_blocks_formulas():
    from ckaad_fast.scoring.results import escape_cell, unescape_cell

    for text in ("=1+1", "+x", "-y", "@z", "\tt", "\rr", "'q", "a.png", "", "=", "''=x"):
        escaped = escape_cell(text)
        assert not escaped.startswith(("=", "+", "-", "@", "\t", "\r"))
        assert unescape_cell(escaped) == text


# -- 2. link loops -------------------------------------------------------------------------------
def test_link_loops_neither_hang_nor_repeat_images(ckpt, tmp_path):
    root = tmp_path / "data" / "in"
    for i in range(3):
        png(root / "sub" / f"{i}.png", i)
    os.symlink(".", root / "sub" / "self")
    os.symlink("..", root / "sub" / "up")
    os.symlink(root / "sub" / "0.png", root / "alias.png")  # the same file under a second name
    out = tmp_path / "out"
    assert score(ckpt, root, out) == 0
    rows = rows_of(out)
    assert len(rows) == 3
    assert len({os.path.realpath(r["path"]) for r in rows}) == 3


# -- 3. bad numbers --------------------------------------------------------------------------------
def test_a_nan_image_is_an_error_row_never_normal(ckpt, tmp_path):
    root = tmp_path / "in"
    png(root / "good.png")
    arr = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    arr[3, 4] = np.nan
    Image.fromarray(arr, mode="F").save(root / "scan.tif")
    out = tmp_path / "out"
    assert score(ckpt, root, out, "--threshold", "0.1") == NOT_ALL
    rows = {os.path.basename(r["path"]): r for r in rows_of(out)}
    assert rows["scan.tif"]["score"] == "" and "non-finite" in rows["scan.tif"]["error"]
    assert rows["scan.tif"]["is_anomalous"] == ""  # no verdict, never False
    assert rows["good.png"]["score"] and rows["good.png"]["error"] == ""


def test_a_model_that_gives_nan_fails_closed(tmp_path):
    model = tiny()
    with torch.no_grad():
        next(model.autoencoder.parameters()).fill_(float("nan"))
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, model)
    root = tmp_path / "in"
    png(root / "a.png")
    out = tmp_path / "out"
    assert score(bad, root, out, "--threshold", "0.5") == NOT_ALL
    (row,) = rows_of(out)
    assert row["score"] == "" and "non-finite" in row["error"] and row["is_anomalous"] == ""


# -- 4. two runs, resumes --------------------------------------------------------------------------
def test_a_second_run_on_the_same_folder_refuses_naming_the_first(ckpt, tmp_path, capsys):
    root = tmp_path / "in"
    png(root / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                 "what": "ckaad-fast score", "since": "now"}))
        assert score(ckpt, root, out) == ERROR
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and err.strip().count("\n") == 0
        assert not (out / "scores.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone: the stale lock is taken over, and released at the end.
    assert score(ckpt, root, out) == 0
    assert len(rows_of(out)) == 1 and not (out / LOCK_NAME).exists()


def test_resume_refuses_another_model_or_other_options(ckpt, tmp_path, capsys):
    root = tmp_path / "in"
    png(root / "a.png")
    png(root / "b.png", 1)
    out = tmp_path / "out"
    assert score(ckpt, [root / "a.png"], out) == 0
    other = tmp_path / "other.pt"
    save_checkpoint(other, tiny(seed=1))
    capsys.readouterr()
    assert score(other, root, out, "--resume") == ERROR
    assert "--resume" in capsys.readouterr().err
    assert score(ckpt, root, out, "--resume", "--topk", "3") == ERROR
    assert [os.path.basename(r["path"]) for r in rows_of(out)] == ["a.png"]  # nothing mixed in
    assert score(ckpt, root, out, "--resume") == 0
    assert len(rows_of(out)) == 2


def test_resume_matches_rows_however_the_path_is_spelt(ckpt, tmp_path, monkeypatch):
    root = tmp_path / "in"
    for i in range(3):
        png(root / f"{i}.png", i)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert score(ckpt, "in", out) == 0
    first = rows_of(out)
    assert score(ckpt, root.resolve(), out, "--resume") == 0
    rows = rows_of(out)
    assert len(rows) == 3  # no duplicates
    assert [r["score"] for r in rows] == [r["score"] for r in first]  # kept, not scored again


# -- 5. maps ---------------------------------------------------------------------------------------
def test_map_names_never_collide(ckpt, tmp_path):
    root = tmp_path / "in"
    for i, n in enumerate(["a.png", "a.jpg", "a.png.png"]):
        png(root / "x.png", i).rename(root / n)
    out = tmp_path / "out"
    assert score(ckpt, root, out, "--maps", "npy") == 0
    maps = sorted(p.name for p in (out / "maps").iterdir() if p.suffix == ".npy")
    assert maps == ["a.jpg.npy", "a.png.npy", "a.png.png.npy"]
    rows = {os.path.basename(r["path"]): r for r in rows_of(out)}
    for name in rows:  # each map is its own image's
        m = np.load(out / "maps" / f"{name}.npy")
        assert m.shape == (SIZE, SIZE) and np.isfinite(m).all()


def test_results_inside_the_input_are_not_scored(ckpt, tmp_path):
    root = tmp_path / "in"
    for i in range(2):
        png(root / f"{i}.png", i)
    out = root / "results"
    assert score(ckpt, root, out, "--maps", "png") == 0
    assert score(ckpt, root, out, "--maps", "png", "--resume") == 0
    assert sorted(os.path.basename(r["path"]) for r in rows_of(out)) == ["0.png", "1.png"]


# -- 6. checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, words", [
    (lambda c: c["config"].update(image_size=[-4, -4]), "image_size"),
    (lambda c: c["config"].update(sigma=-1.0), "sigma"),
    (lambda c: c["config"].update(border="wrap"), "border"),
    (lambda c: c.pop("config"), "no config"),
    (lambda c: c["model"].pop(next(iter(c["model"]))), "do not fit"),
])
def test_a_bad_checkpoint_is_refused_before_anything_is_written(ckpt, tmp_path, capsys, edit, words):
    c = load_checkpoint(ckpt)
    edit(c)
    bad = tmp_path / "bad.pt"
    torch.save(c, bad)
    root = tmp_path / "in"
    png(root / "a.png")
    out = tmp_path / "out"
    assert score(bad, root, out) == ERROR
    err = capsys.readouterr().err
    assert "--checkpoint" in err and words in err and err.strip().count("\n") == 0
    assert not (out / "scores.csv").exists()
    assert score(ckpt, root, out) == 0  # nothing blocks the next run


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_hostile_checkpoint_is_named_unsafe(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ckaad_fast.checkpoint", "version": 1, "x": _Evil()}, evil)
    png(tmp_path / "in" / "a.png")
    assert score(evil, tmp_path / "in", tmp_path / "out") == ERROR
    err = capsys.readouterr().err
    assert "may be unsafe" in err and "system" in err and "will likely succeed" not in err


def test_hostile_backbone_weights_are_refused_without_advice_to_run_them(tmp_path):
    from ckaad_fast.models import build_backbone

    evil = tmp_path / "weights.pt"
    torch.save({"conv1.weight": _Evil()}, evil)
    with pytest.raises(RuntimeError) as e:
        build_backbone("resnet18", weights=str(evil), layers=(1, 2))
    msg = str(e.value)
    assert "system" in msg and str(evil) in msg
    assert "will likely succeed" not in msg and "unless you trust its source" in msg


# -- 7. disks and files ----------------------------------------------------------------------------
def test_a_full_disk_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    from ckaad_fast.data.synthetic import make_texture_dataset

    root = make_texture_dataset(tmp_path / "data", "gravel", n_train=4, n_test_good=2, n_test_defect=1, n_coarse=2,
                                image_size=SIZE, seed=0)

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    rc = main(["train", "--data", str(root), "--category", "gravel", "--backbone", "efficientnet_lite0",
               "--layers", "1", "2", "--weights", "none", "--image-size", str(SIZE), "--epochs", "1",
               "--batch-size", "2", "--strategy", "recon", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == ERROR and "checkpoint.pt" in err and "Traceback" not in err and err.strip().count("\n") == 0
    assert not list((tmp_path / "run").glob(".checkpoint.pt.*.tmp"))  # no temporary left behind


def test_eval_json_into_a_folder_is_one_line(ckpt, tmp_path, capsys):
    from ckaad_fast.data.synthetic import make_texture_dataset

    root = make_texture_dataset(tmp_path / "data", "gravel", n_train=2, n_test_good=2, n_test_defect=1, n_coarse=1,
                                image_size=SIZE, seed=0)
    (tmp_path / "j").mkdir()
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--category", "gravel", "--quiet",
               "--json", str(tmp_path / "j")])
    err = capsys.readouterr().err
    assert rc == ERROR and "--json" in err and err.strip().count("\n") == 0


def test_an_unwritable_results_file_is_one_line_and_keeps_what_was_scored(ckpt, tmp_path, capsys, monkeypatch):
    import ckaad_fast.scoring.results as results

    root = tmp_path / "in"
    png(root / "a.png")
    out = tmp_path / "out"
    real = results.atomic_write_text

    def full(path, *a, **k):
        if str(path).endswith("scores.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(results, "atomic_write_text", full)
    assert score(ckpt, root, out) == ERROR
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


def test_files_get_the_umask_and_stale_temporaries_go(ckpt, tmp_path):
    root = tmp_path / "in"
    png(root / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".scores.csv.k3j4h5g6.tmp").write_text("half a file from a killed run")
    old = os.umask(0o022)
    try:
        assert score(ckpt, root, out, "--maps", "npy") == 0
    finally:
        os.umask(old)
    for f in [out / "scores.csv", out / "run.json", *(out / "maps").iterdir()]:
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert not (out / ".scores.csv.k3j4h5g6.tmp").exists()


# -- 8. a killed run -------------------------------------------------------------------------------
def test_a_killed_run_resumes_to_the_uninterrupted_result(ckpt, tmp_path):
    root = tmp_path / "in"
    for i in range(7):
        png(root / f"{i}.png", i)
    ref = tmp_path / "ref"
    assert score(ckpt, root, ref) == 0
    out = tmp_path / "out"
    args = ["-m", "ckaad_fast", "score", "--checkpoint", str(ckpt), "--input", str(root), "--out", str(out),
            "--batch-size", "2", "--num-workers", "0", "--no-progress"]
    # Stops dead (os._exit, no clean-up) after its second batch's periodic save.
    proc = subprocess.run([sys.executable, *args], env={**os.environ, "CKAAD_FAST_TEST_DIE_AFTER_BATCHES": "2",
                                                        "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    assert proc.returncode == 99
    kept = rows_of(out)
    assert 0 < len(kept) < 7 and (out / LOCK_NAME).exists()  # the dead run's lock is left behind
    assert score(ckpt, root, out, "--resume") == 0  # ... and taken over
    assert (out / "scores.csv").read_bytes() == (ref / "scores.csv").read_bytes()


def test_a_checkpoint_with_a_huge_image_size_is_refused_before_any_work(tmp_path, capsys):
    from ckaad_fast.ops.scoring import MAX_OUT_SIDE
    from ckaad_fast.validation import MAX_IMAGE_SIDE

    assert MAX_IMAGE_SIDE == MAX_OUT_SIDE  # the bound the ops accept
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "m.pt", SIZE))
    for side in (100_000, 5000):
        ckpt["config"]["image_size"] = [side, side]
        torch.save(ckpt, tmp_path / "huge.pt")
        png(tmp_path / "in" / "a.png")
        assert score(tmp_path / "huge.pt", tmp_path / "in", tmp_path / f"out{side}") == ERROR
        err = capsys.readouterr().err
        assert "image_size" in err and "4096" in err and err.strip().count("\n") == 0
        assert not (tmp_path / f"out{side}" / "scores.csv").exists()  # nothing half-written


def test_a_resume_of_rows_without_a_manifest_is_refused(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", SIZE)
    for i in range(3):
        png(tmp_path / "in" / f"{i}.png", seed=i)
    out = tmp_path / "out"
    assert score(ckpt, tmp_path / "in", out) == 0
    (out / "run.json").unlink()  # rows of unknown origin (another model could have made them)
    before = (out / "scores.csv").read_bytes()
    assert score(ckpt, tmp_path / "in", out, "--resume") == ERROR
    err = capsys.readouterr().err
    assert "--resume" in err and "run.json" in err and "--overwrite" in err and "--adopt-rows" in err
    assert (out / "scores.csv").read_bytes() == before  # nothing mixed in, nothing dropped
    # Told what it resumes: the rows are kept as this model's, the new image scored, the old rows
    # get the decision column from their scores, and run.json records the declaration.
    old_scores = {r["path"]: r["score"] for r in rows_of(out)}
    png(tmp_path / "in" / "3.png", seed=3)
    assert score(ckpt, tmp_path / "in", out, "--resume", "--adopt-rows", "--threshold", "0") == 0
    rows = rows_of(out)
    assert len(rows) == 4 and all(r["is_anomalous"] == "True" for r in rows)
    assert all(r["score"] == old_scores[r["path"]] for r in rows if r["path"] in old_scores)
    assert json.loads((out / "run.json").read_text())["adopted"]["rows"] == 3
    # A folder whose manifest already says what made it has nothing to adopt.
    capsys.readouterr()
    assert score(ckpt, tmp_path / "in", out, "--resume", "--adopt-rows") == ERROR
    assert "--adopt-rows" in capsys.readouterr().err


def test_a_resume_through_a_linked_folder_matches_the_same_images(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", SIZE)
    for i in range(4):
        png(tmp_path / "in" / f"{i}.png", seed=i)
    (tmp_path / "link").symlink_to(tmp_path / "in", target_is_directory=True)
    out = tmp_path / "out"
    assert score(ckpt, tmp_path / "in", out) == 0
    assert score(ckpt, tmp_path / "link", out, "--resume") == 0
    assert len(rows_of(out)) == 4  # one row per image, whichever way its folder is spelt


@pytest.mark.slow
def test_sigterm_ends_score_like_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    ckpt = tiny_checkpoint(tmp_path / "m.pt", SIZE)
    for i in range(400):
        png(tmp_path / "in" / f"{i:03d}.png", seed=i)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ckaad_fast", "score", "--checkpoint", str(ckpt), "--input",
                             str(tmp_path / "in"), "--out", str(out), "--batch-size", "1", "--num-workers", "0",
                             "--no-progress"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the lock is taken once the handler is in place
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    # 130, the status of an interrupted command, every time (a second SIGTERM is ignored while
    # the command winds down, and an interrupt outside the command is caught by main).
    assert proc.returncode == 130, err
    assert "interrupted" in err and "kept in" in err and "--resume" in err
    assert not (out / LOCK_NAME).exists()  # released on the way out
    assert (out / "scores.csv").is_file()
