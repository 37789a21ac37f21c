"""torchrun on the CPU: 2 processes over gloo (loopback only) against one process.

- training: one epoch on a tiny data set gives the losses of one process with the same global
  batch, and the checkpoint (written by rank 0 alone) loads in a single process;
- evaluation: sharded and gathered, the metrics equal one process's exactly;
- scoring: a sharded folder gives exactly the single-process scores.csv (and maps), in order;
- a rank killed mid-run (test-only fault injection) leaves parts that ``--resume`` completes, on
  one process or two, into exactly the single-process results.

The samplers and shards are also checked in-process, without a process group.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ckaad_fast import distributed as ddp
from ckaad_fast.cli import main
from ckaad_fast.model import ModelConfig, save_checkpoint
from ckaad_fast.training import CKAAD, ckaad_from_checkpoint
from ckaad_fast.scoring import PARTS_DIR, part_name, read_scores_csv
from ckaad_fast.data.synthetic import make_texture_dataset

pytestmark = [
    pytest.mark.slow,  # torchrun: see conftest.py
    pytest.mark.filterwarnings("ignore:.*random weights:UserWarning"),
    pytest.mark.usefixtures("one_thread"),  # torchrun workers run with OMP_NUM_THREADS=1
]

TIMEOUT = 120  # seconds per torchrun launch: a hang fails the test instead of the CI job



def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, env=None, check=True, expect=0) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc -m ckaad_fast ARGS`` on loopback;
    ``check``: its exit code must be ``expect``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "ckaad_fast",
           *map(str, args)]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------
# In-process: shards and samplers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world,block", [(13, 2, 1), (13, 2, 2), (12, 3, 2), (3, 4, 1), (0, 2, 3), (10, 2, 4)])
def test_shards_are_contiguous_and_restore_the_order(n, world, block):
    items = list(range(n))
    parts = [ddp.shard(items, r, world, block=block) for r in range(world)]
    assert ddp.unshard(parts) == items
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) < 2 * block  # one block more, and a short last block
    for p in parts[:-1]:
        # Every part but the last ends on a block boundary: whole batches of the global order.
        assert p == [] or (p[-1] + 1) % block == 0 or p[-1] == n - 1


def test_single_process_helpers_are_identities():
    assert not ddp.is_distributed() and ddp.rank() == 0 and ddp.world_size() == 1 and ddp.is_main()
    ddp.barrier()
    assert ddp.broadcast_object(3) == 3 and ddp.gather_object(3) == [3] and ddp.all_gather_object(3) == [3]
    t = torch.arange(3.0)
    assert ddp.all_reduce_mean(t) is t
    assert ddp.run_on_main(lambda: 5) == 5
    assert ddp.local_device("cuda:3") == "cuda:3"
    assert ddp.init_distributed("cpu") == ddp.DistInfo()  # WORLD_SIZE unset: nothing to join


@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (9, 3, 3), (8, 2, 2)])
def test_global_batch_sampler_deals_the_single_process_batches(n, batch, world):
    """Rank r's k-th batch is the r-th world-stride of the k-th single-process batch, pass after
    pass (the anomaly loader cycles on one generator), with the same generator consumption."""
    data = list(range(n))

    def single():
        g = torch.Generator().manual_seed(7)
        loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, generator=g)
        return [b.tolist() for _ in range(3) for b in loader]

    def rank_batches(r):
        g = torch.Generator().manual_seed(7)
        s = ddp.GlobalBatchSampler(data, batch, g, num_replicas=world, rank=r)
        loader = DataLoader(data, batch_size=batch // world, sampler=s, drop_last=True, generator=g)
        assert len(loader) == n // batch
        return [b.tolist() for _ in range(3) for b in loader]

    ref = single()
    per_rank = [rank_batches(r) for r in range(world)]
    for k, global_batch in enumerate(ref):
        for r in range(world):
            assert per_rank[r][k] == global_batch[r::world]


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ddp.GlobalBatchSampler(list(range(10)), 3, torch.Generator(), num_replicas=2, rank=0)


# ------------------------------------------------------------------------------------------------
# Training and evaluation under torchrun
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    return make_texture_dataset(tmp_path_factory.mktemp("tex"), "gravel", n_train=8, n_test_good=2,
                                n_test_defect=1, n_coarse=4, image_size=64, seed=0)


def _train_args(root, out):
    return ["train", "--data", root, "--category", "gravel", "--backbone", "resnet18", "--layers", "1", "2",
            "--weights", "none", "--image-size", "64", "--epochs", "1", "--batch-size", "4",
            "--anomaly-dir", root / "gravel" / "coarse_anomalies", "--out", out, "--quiet"]


def test_two_ranks_train_like_one_process_and_evaluate_alike(texture, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(a) for a in _train_args(texture, one)]) == 0
    proc = torchrun(_train_args(texture, two))
    assert proc.stdout.count("checkpoint:") == 1  # rank 0 alone reports

    a = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 1 and a[0]["steps"] == b[0]["steps"] == 2  # 8 images, global batch 4
    for k in ("d_loss", "g_loss", "recon_loss"):
        assert b[0][k] == pytest.approx(a[0][k], rel=1e-5, abs=1e-6), k
    # Rank 0 alone writes: the checkpoint, the log and (with TensorBoard installed) one event file.
    files = sorted(p.name for p in two.iterdir())
    curves = [f for f in files if f.startswith("events.out.tfevents.")]
    assert [f for f in files if f not in curves] == ["checkpoint.pt", "log.jsonl"] and len(curves) <= 1
    model = ckaad_from_checkpoint(two / "checkpoint.pt")  # a single process reads rank 0's checkpoint
    assert isinstance(model, CKAAD) and model.discriminator is not None

    # A 2-process checkpoint resumes in one process (the global batch does not depend on the
    # number of processes), and goes on as the 1-process run does.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for out in (one, two):
            assert main(["train", "--data", str(texture), "--category", "gravel", "--anomaly-dir",
                         str(texture / "gravel" / "coarse_anomalies"), "--out", str(out), "--resume",
                         "--epochs", "2", "--quiet"]) == 0
    a2, b2 = (json.loads((o / "log.jsonl").read_text().splitlines()[-1]) for o in (one, two))
    assert a2["epoch"] == b2["epoch"] == 2
    for k in ("d_loss", "g_loss", "recon_loss"):
        assert b2[k] == pytest.approx(a2[k], rel=1e-4, abs=1e-5), k

    # Evaluation, sharded over 2 ranks and gathered on rank 0: exactly one process's metrics.
    m1, m2 = tmp_path / "m1.json", tmp_path / "m2.json"
    ev = ["eval", "--checkpoint", two, "--data", texture, "--category", "gravel", "--batch-size", "2",
          "--quiet", "--json"]
    assert main([str(a) for a in ev + [m1]]) == 0
    proc = torchrun(ev + [m2])
    assert proc.stdout.count("image best F1") == 1  # one metrics table: rank 0 alone prints
    r1, r2 = json.loads(m1.read_text()), json.loads(m2.read_text())
    assert r1 == r2 and r1["num_images"] == 2 + 4


def test_a_global_batch_that_does_not_split_fails_on_every_rank(texture, tmp_path):
    """--batch-size is the global batch: 3 images over 2 processes is refused, with one clear
    line, before any collective (so no rank is left waiting)."""
    args = _train_args(texture, tmp_path / "run")
    args[args.index("--batch-size") + 1] = "3"
    proc = torchrun(args, check=False)
    assert proc.returncode != 0
    # Each rank raises the same error (torchrun may stop the second before it prints it).
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ckaad-fast train: error:")]
    assert lines and all("must be a multiple of the number of processes (2)" in x for x in lines)
    assert 'ckaad_fast/training.py", line' not in proc.stderr  # one line each, no traceback


# ------------------------------------------------------------------------------------------------
# Scoring under torchrun
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """A tiny checkpoint, a folder of 12 images and one unreadable file, and the single-process
    results (scores.csv with a threshold, npy maps) to compare with."""
    base = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=32, topk=10, strategy="recon")
        model = CKAAD(cfg, weights="none").eval()
    ckpt = base / "tiny.pt"
    save_checkpoint(ckpt, model)
    rng = np.random.default_rng(0)
    root = base / "in"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / sub / f"{i}.png")
    (root / "b" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ref = base / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers run (OMP_NUM_THREADS=1): the same bits
    try:
        assert main(score_args(ckpt, root, ref)) == NOT_ALL
    finally:
        torch.set_num_threads(threads)
    return ckpt, root, ref


NOT_ALL = 1  # the exit code of a score run that could not score every image: the inputs hold a corrupt file


def score_args(ckpt, root, out, *extra):
    return ["score", "--checkpoint", str(ckpt), "--input", str(root), "--out", str(out), "--batch-size", "2",
            "--num-workers", "0", "--maps", "npy", "--threshold", "2.3", "--no-progress", *extra]


def assert_same_results(out, ref):
    assert (out / "scores.csv").read_bytes() == (ref / "scores.csv").read_bytes()
    maps = sorted(p.relative_to(ref) for p in (ref / "maps").rglob("*.npy"))
    assert len(maps) == 12
    assert sorted(p.relative_to(out) for p in (out / "maps").rglob("*.npy")) == maps
    for m in maps:
        assert filecmp.cmp(out / m, ref / m, shallow=False), m
    assert not (out / PARTS_DIR).exists()


def test_sharded_scoring_equals_one_process(scoring, tmp_path):
    ckpt, root, ref = scoring
    rows = read_scores_csv(ref / "scores.csv")
    assert len(rows) == 13 and rows[-1]["error"] and {r["is_anomalous"] for r in rows[:-1]} == {"True", "False"}
    out = tmp_path / "out"
    proc = torchrun(score_args(ckpt, root, out), expect=NOT_ALL)
    assert proc.stderr.count("scored 12 of 13 images") == 1  # rank 0 reports for the whole run
    assert_same_results(out, ref)


def test_a_killed_rank_leaves_parts_that_resume_completes(scoring, tmp_path):
    ckpt, root, ref = scoring
    out = tmp_path / "out"
    # Rank 1 (images b/2 .. b/5 and the corrupt file: 3 batches of 2) stops dead after its 2nd batch.
    proc = torchrun(score_args(ckpt, root, out), env={ddp.DIE_ENV: "1:2"}, check=False)
    assert proc.returncode != 0
    assert re.search(rf"exitcode\s*:\s*{ddp.DIE_EXIT_CODE}\b", proc.stdout + proc.stderr)
    assert not (out / "scores.csv").exists()  # never merged
    parts = sorted((out / PARTS_DIR).glob("*.csv"))
    assert out / PARTS_DIR / part_name(1, 2) in parts
    # Its part holds the batch it finished (the one in flight is lost); rank 0's, when it finished
    # before torchrun stopped it, all of its 8 images.
    dead = read_scores_csv(out / PARTS_DIR / part_name(1, 2))
    assert [os.path.basename(r["path"]) for r in dead] == ["2.png", "3.png"]
    kept = sum(len(read_scores_csv(p)) for p in parts)

    # Resume on one process (a copy) and on two: exactly the uninterrupted single-process results.
    single = tmp_path / "single"
    shutil.copytree(out, single)
    assert main(score_args(ckpt, root, single, "--resume")) == NOT_ALL
    assert_same_results(single, ref)

    proc = torchrun(score_args(ckpt, root, out, "--resume"), expect=NOT_ALL)
    assert f"({kept} already done, skipped)" in proc.stderr
    assert_same_results(out, ref)


def test_sharded_scoring_refuses_to_clobber_results(scoring, tmp_path):
    """Without --resume or --overwrite, parts left by a crash are refused like a scores.csv."""
    ckpt, root, ref = scoring
    out = tmp_path / "out"
    (out / PARTS_DIR).mkdir(parents=True)
    shutil.copy(ref / "scores.csv", out / PARTS_DIR / part_name(0, 3))
    assert main(score_args(ckpt, root, out)) == 2
    assert main(score_args(ckpt, root, out, "--overwrite")) == NOT_ALL
    assert_same_results(out, ref)
