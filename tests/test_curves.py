"""Training curves: TensorBoard's own reader finds every loss, the discriminator's energies and the
evaluation metrics of a two-epoch run, one point per epoch; a resume keeps one point per epoch;
watching the game does not change it."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from ckaad_fast.data import AnomalyFolderDataset, MVTecDataset  # noqa: E402
from ckaad_fast.data.synthetic import make_texture_dataset  # noqa: E402
from ckaad_fast.training import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_texture_dataset(tmp_path_factory.mktemp("tex"), "grass", n_train=6, n_test_good=3,
                                n_test_defect=1, n_coarse=3, image_size=SIZE, seed=0)
    mean = std = (0.5, 0.5, 0.5)
    return (MVTecDataset(root, "grass", "train", SIZE, mean, std), MVTecDataset(root, "grass", "test", SIZE, mean, std),
            AnomalyFolderDataset(root / "grass" / "coarse_anomalies", SIZE, mean, std))


def _cfg(**kw):
    return TrainConfig(**{**dict(backbone="efficientnet_lite0", layers=(1, 2), weights="none", image_size=SIZE,
                                 epochs=2, batch_size=2, strategy="cka_patch", eval_every=1), **kw})


def _curves(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_a_two_epoch_run_has_every_curve(data, tmp_path):
    train_set, test_set, coarse = data
    res = train(_cfg(), train_set, anomaly_set=coarse, eval_set=test_set, out_dir=tmp_path / "run", progress=False)
    acc = _curves(tmp_path / "run")
    tags = set(acc.Tags()["scalars"])
    want = {"loss/discriminator", "loss/generator", "loss/reconstruction", "energy/normal", "energy/reconstructed",
            "energy/anomalous", "eval/image_auroc", "eval/pixel_auroc", "time/epoch_seconds"}
    assert want <= tags, want - tags
    for tag in ("loss/reconstruction", "energy/anomalous", "eval/image_auroc"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    # The curves are the log's numbers (float32 in the event file).
    log = res.history
    assert [e.value for e in acc.Scalars("loss/reconstruction")] == pytest.approx([r["recon_loss"] for r in log], rel=1e-6)
    assert [e.value for e in acc.Scalars("energy/normal")] == pytest.approx([r["energy"]["normal"] for r in log],
                                                                           rel=1e-6)


def test_curves_change_nothing_and_a_resume_keeps_one_point_per_epoch(data, tmp_path, monkeypatch):
    train_set, _, coarse = data
    watched = train(_cfg(eval_every=0), train_set, anomaly_set=coarse, out_dir=tmp_path / "a", progress=False)
    from ckaad_fast.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module.Trainer, "energies", lambda self: None)  # nobody watching
    plain = train(_cfg(eval_every=0), train_set, anomaly_set=coarse, out_dir=tmp_path / "b", progress=False)
    a, b = watched.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    train(_cfg(eval_every=0, epochs=1), train_set, anomaly_set=coarse, out_dir=tmp_path / "r", progress=False)
    train(_cfg(eval_every=0), train_set, anomaly_set=coarse, out_dir=tmp_path / "r", resume=True, progress=False)
    assert [e.step for e in _curves(tmp_path / "r").Scalars("loss/generator")] == [1, 2]
