"""Training loop: every strategy, the fused losses, alpha, resume, seeding, checkpoints, AMP, compile."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ckaad_fast import ops
from ckaad_fast.data import AnomalyFolderDataset, MVTecDataset
from ckaad_fast.evaluation import evaluate_model
from ckaad_fast.model import Detector, load_checkpoint, model_from_checkpoint
from ckaad_fast.training import CKAAD, ckaad_from_checkpoint
from ckaad_fast.data.synthetic import make_texture_dataset
from ckaad_fast.strategies import STRATEGIES, mixture
from ckaad_fast.training import TrainConfig, Trainer, train

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

SIZE = 64
# Mechanics tests use the smallest model: EfficientNet-Lite0's first two layers with random weights
# (an auto-encoder of 0.3M parameters); the CLI test runs resnet18.
BACKBONE, LAYERS = "efficientnet_lite0", (1, 2)
MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_texture_dataset(tmp_path_factory.mktemp("tex"), "grass", n_train=6, n_test_good=3,
                                n_test_defect=1, n_coarse=3, image_size=SIZE, seed=0)
    train_set = MVTecDataset(root, "grass", "train", SIZE, MEAN, STD)
    test_set = MVTecDataset(root, "grass", "test", SIZE, MEAN, STD)
    coarse = AnomalyFolderDataset(root / "grass" / "coarse_anomalies", SIZE, MEAN, STD)
    return {"root": root, "train": train_set, "test": test_set, "coarse": coarse}


def tiny(**kw) -> TrainConfig:
    base = dict(backbone=BACKBONE, layers=LAYERS, weights="none", image_size=SIZE, epochs=1, batch_size=2)
    return TrainConfig(**{**base, **kw})


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_trains_one_epoch(strategy, data, tmp_path):
    res = train(tiny(strategy=strategy), data["train"], out_dir=tmp_path, progress=False)
    (rec,) = res.history
    assert rec["epoch"] == 1 and rec["steps"] == 3  # 6 images, batch 2, drop_last
    for k in ("g_loss", "recon_loss"):
        assert math.isfinite(rec[k])
    if strategy in ("cka_patch", "cka_img", "gan"):
        assert math.isfinite(rec["d_loss"]) and rec["d_loss"] > 0
    else:
        assert rec["d_loss"] is None
    if strategy in ("recon", "cka_patch"):
        # lam * the energy of the reconstructions is small: G is close to the recon loss.
        assert rec["g_loss"] >= rec["recon_loss"] - 1e-6
    if strategy == "recon":
        assert rec["g_loss"] == rec["recon_loss"]
    assert read_log(res.log) == res.history
    ckpt = torch.load(res.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["train_config"]["strategy"] == strategy
    assert (ckpt["optimizers"]["d"] is None) == (strategy in ("recon", "recon_sub"))


def test_step_goes_through_the_fused_ops(data, tmp_path, monkeypatch):
    calls = {"cosine_reconstruction_loss": 0, "discriminator_loss": 0, "generator_loss": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, counted)
    res = train(tiny(), data["train"], out_dir=tmp_path, progress=False)
    steps = res.history[0]["steps"]
    # Equal normal and pseudo-anomaly batches with alpha = 0.5: one call of each op per step.
    assert calls == {"cosine_reconstruction_loss": steps, "discriminator_loss": steps, "generator_loss": steps}


def test_real_coarse_anomalies_and_alpha_weighting(data, tmp_path, monkeypatch):
    # 3 coarse anomalies and batch 4: anomaly batches of 3, so the generated term is weighted by
    # alpha over two separate calls instead of one call on the 4 + 3 concatenation.
    calls = []
    real = ops.discriminator_loss
    monkeypatch.setattr(ops, "discriminator_loss", lambda *a, **k: calls.append(a[2][0].shape[0]) or real(*a, **k))
    res = train(tiny(batch_size=4), data["train"], anomaly_set=data["coarse"], out_dir=tmp_path, progress=False)
    assert res.history[0]["steps"] == 1 and math.isfinite(res.history[0]["d_loss"])
    assert calls == [4, 3]


def test_mixture_weights_generated_terms_by_alpha():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(7, 1, 3, 3, generator=g), torch.randn(7, 1, 2, 2, generator=g)]

    def term(x):
        return ops.generator_loss(x)

    alpha = 0.3
    want = alpha * term([t[:4] for t in s]) + (1 - alpha) * term([t[4:] for t in s])
    torch.testing.assert_close(mixture(term, s, 4, alpha), want)
    # In the proportion alpha : 1 - alpha, the mixture is the mean over the concatenation.
    torch.testing.assert_close(mixture(term, [t[:6] for t in s], 3, 0.5), term([t[:6] for t in s]))
    want = 0.5 * term([t[:3] for t in s]) + 0.5 * term([t[3:6] for t in s])
    torch.testing.assert_close(mixture(term, [t[:6] for t in s], 3, 0.5), want)


def test_resume_equals_uninterrupted_and_seeded_runs_repeat(data, tmp_path):
    full = train(tiny(epochs=2), data["train"], out_dir=tmp_path / "full", progress=False)
    part = train(tiny(epochs=1), data["train"], out_dir=tmp_path / "part", progress=False)
    part = train(tiny(epochs=2), data["train"], out_dir=tmp_path / "part", resume=True, progress=False)
    again = train(tiny(epochs=2), data["train"], out_dir=tmp_path / "again", progress=False)
    other = train(tiny(epochs=2, seed=1), data["train"], out_dir=tmp_path / "other", progress=False)

    ref = full.model.state_dict()
    assert same_state(ref, part.model.state_dict())
    assert same_state(ref, again.model.state_dict())
    assert not same_state(ref, other.model.state_dict())

    def losses(res):
        return [(r["d_loss"], r["g_loss"], r["recon_loss"]) for r in res.history]

    assert losses(full) == losses(part) == losses(again)
    assert [r["epoch"] for r in read_log(part.log)] == [1, 2]
    a = load_checkpoint(full.checkpoint)
    b = load_checkpoint(part.checkpoint)
    for name in ("ae", "d"):
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys()
        assert all(same_state(sa[k], sb[k]) for k in sa)


def test_resume_and_overwrite_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(tiny(), data["train"], out_dir=tmp_path, resume=True, progress=False)
    train(tiny(strategy="recon"), data["train"], out_dir=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(tiny(strategy="recon"), data["train"], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="lam"):
        train(tiny(strategy="recon", epochs=2, lam=0.5), data["train"], out_dir=tmp_path, resume=True, progress=False)
    # Nothing left to do: returns the checkpoint's history.
    res = train(tiny(strategy="recon"), data["train"], out_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in res.history] == [1]


def test_checkpoint_is_weights_only_and_scores(data, tmp_path):
    res = train(tiny(strategy="cka_img"), data["train"], out_dir=tmp_path, eval_set=data["test"], progress=False)
    ckpt = torch.load(res.checkpoint, map_location="cpu", weights_only=True)
    assert TrainConfig.from_dict(ckpt["train_config"]) == tiny(strategy="cka_img")
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    model = model_from_checkpoint(ckpt)  # what scores: no discriminator
    assert type(model) is Detector and not hasattr(model, "discriminator") and model.config.strategy == "cka_img"
    full = ckaad_from_checkpoint(ckpt)  # what training resumes: with it
    assert isinstance(full, CKAAD) and full.discriminator is not None
    logged = res.history[0]["eval"]
    metrics = evaluate_model(model, data["test"], batch_size=2, progress=False)
    for k in ("image_auroc", "image_f1", "image_acc", "pixel_auroc", "aupro", "aupro_per_image"):
        assert 0.0 <= metrics[k] <= 1.0
        assert metrics[k] == pytest.approx(logged[k], abs=1e-4)
    assert metrics["num_images"] == len(data["test"])


def one_step(cfg, data):
    torch.manual_seed(0)
    model = CKAAD(cfg.model_config(), weights="none")
    trainer = Trainer(model, cfg)
    x = torch.stack([data["train"][i][0] for i in range(2)])
    before = [p.detach().clone() for p in model.autoencoder.parameters()]
    losses = trainer.step(x, x.flip(-1))
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.autoencoder.parameters()))
    return losses


def test_bf16_autocast_on_cpu(data):
    bf16 = one_step(tiny(amp="bf16"), data)
    fp32 = one_step(tiny(), data)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


def test_compiled_step_equals_the_eager_step(data):
    # torch.compile's "eager" backend runs the captured graph as is: same losses, same update.
    compiled = one_step(tiny(compile="eager"), data)
    eager = one_step(tiny(), data)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_efficientnet_lite0_imagenet_tiny_run(data, tmp_path):
    cfg = TrainConfig(backbone="efficientnet_lite0", layers=(1, 2), weights="imagenet", image_size=SIZE,
                      epochs=1, batch_size=2)
    assert cfg.normalization() == (MEAN, STD)
    res = train(cfg, data["train"], out_dir=tmp_path, eval_set=data["test"], progress=False)
    rec = res.history[0]
    assert rec["steps"] == 3 and math.isfinite(rec["d_loss"]) and math.isfinite(rec["g_loss"])
    assert 0.0 <= rec["eval"]["pixel_auroc"] <= 1.0


@pytest.mark.parametrize(
    "field, value",
    [("strategy", "vae"), ("backbone", "vgg"), ("layers", (3, 2)), ("epochs", 0), ("batch_size", 0),
     ("ae_lr", -1.0), ("gamma", 1.5), ("alpha", -0.1), ("margin", 0.0), ("betas", (0.5, 1.0)),
     ("amp", "fp8"), ("amp", "fp16"), ("clip_norm", 0.0), ("image_size", 8), ("device", "tpu")],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_data_errors(data, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny(batch_size=7), data["train"], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        train(tiny(image_size=32), data["train"], out_dir=tmp_path, progress=False)


def test_resolve_config_takes_the_papers_domain_defaults_then_the_overrides():
    from ckaad_fast.training import resolve_config

    medical = resolve_config(layout="folder")
    assert (medical.backbone, medical.layers, medical.ae_lr) == ("resnet18", (2, 3), 1e-3)
    industrial = resolve_config(layout="mvtec")
    assert (industrial.backbone, industrial.layers, industrial.ae_lr) == ("wide_resnet50_2", (1, 2, 3), 5e-3)
    given = resolve_config({"backbone": "resnet34", "ae_lr": 2e-3, "lam": None}, layout="folder")
    assert (given.backbone, given.layers, given.ae_lr, given.lam) == ("resnet34", (2, 3), 2e-3, TrainConfig().lam)
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs"):
        resolve_config({"epochs": 0})
    # The authors' per-data-set settings: VisA 400 epochs, MVTec carpet 10 and transistor's AE lr,
    # batch 32 for class folders and 64 for ISIC and Br35H; an option still wins.
    assert resolve_config(layout="visa").epochs == 400
    carpet, transistor = resolve_config(layout="mvtec", category="carpet"), resolve_config(layout="mvtec",
                                                                                           category="transistor")
    assert (carpet.epochs, carpet.ae_lr, transistor.epochs, transistor.ae_lr) == (10, 5e-3, 200, 1e-3)
    assert [resolve_config(layout=l).batch_size for l in ("mvtec", "folder", "isic2018", "br35h")] == [16, 32, 64, 64]
    assert resolve_config({"epochs": 7}, layout="mvtec", category="carpet").epochs == 7


def test_resolve_config_resumes_with_every_option_of_the_run(data, tmp_path):
    from ckaad_fast.errors import ArgumentError
    from ckaad_fast.training import resolve_config

    train(tiny(strategy="recon", lam=0.1, seed=7), data["train"], out_dir=tmp_path, progress=False)
    cfg = resolve_config({"epochs": 3}, layout="mvtec", resume_from=tmp_path)
    assert cfg == tiny(strategy="recon", lam=0.1, seed=7, epochs=3)  # not the mvtec defaults
    # An output folder with no checkpoint yet: the defaults (train() then says nothing is there to resume).
    assert resolve_config(layout="folder", resume_from=tmp_path / "new").backbone == "resnet18"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArgumentError) as e:
        resolve_config(resume_from=tmp_path / "bad")
    assert e.value.name == "resume_from"


def test_metrics_by_defect_type_are_each_types_images_against_the_normal_ones(data):
    from ckaad_fast.evaluation import format_by_defect_type, predict_dataset
    from ckaad_fast.metrics import evaluate

    torch.manual_seed(0)
    model = CKAAD(tiny().model_config(), weights="none").eval()
    metrics = evaluate_model(model, data["test"], batch_size=2, progress=False, by_defect_type=True)
    types = data["test"].defect_types
    assert set(metrics["by_defect_type"]) == set(types) - {"good"}
    pred = predict_dataset(model, data["test"], batch_size=2, progress=False)
    for t, m in metrics["by_defect_type"].items():
        keep = np.array([x in ("good", t) for x in types])
        want = evaluate(pred.labels[keep], pred.scores[keep], pred.masks[keep], pred.maps[keep])
        assert m["image_auroc"] == pytest.approx(want["image_auroc"]) and m["aupro"] == pytest.approx(want["aupro"])
        assert m["num_anomalous"] == sum(x == t for x in types)
    table = format_by_defect_type(metrics)
    assert all(t in table for t in metrics["by_defect_type"])
