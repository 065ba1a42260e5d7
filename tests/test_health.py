"""The training-health figures and the collapse alarm: hand-worked values, a forced collapse, no false alarm."""

import json
import logging

import pytest
import torch

import train
from conftest import train_args  # tests/ is on sys.path
from losses import TripletLoss
from utils import health as health_module
from utils.health import HealthMonitor, embedding_spread, triplet_health

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_embedding_spread_by_hand():
    same = torch.ones(5, 3)
    assert float(embedding_spread(same)) == 0.0
    # Points +-e1: mean 0, so spread = |e|/|e| = 1.
    assert float(embedding_spread(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))) == pytest.approx(1.0)
    # (2, 0) and (2, 2): mean (2, 1); centred norms 1 and 1 -> sqrt(1); norms^2 4 and 8 -> sqrt(6).
    assert float(embedding_spread(torch.tensor([[2.0, 0.0], [2.0, 2.0]]))) == pytest.approx(1 / 6 ** 0.5)


def test_triplet_health_by_hand():
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.5, 0.0]])
    n = torch.tensor([[2.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    out = {"sketch_emb": s, "positive_emb": p, "negative_emb": n}
    h = triplet_health(out, TripletLoss(margin=1.0, distance="euclidean").pair_distance, 1.0)
    # d_sp = 1, 3, 0.5; d_sn = 2, 1, 2: correct for triplets 0 and 2; hinge d_sp - d_sn + 1 = 0, 3, -0.5.
    assert float(h["triplet_acc"]) == pytest.approx(2 / 3)
    assert float(h["active_frac"]) == pytest.approx(1 / 3, abs=1e-5)  # triplet 0 sits on the hinge (eps)
    assert float(h["emb_spread"]) == pytest.approx(0.5 * float(embedding_spread(torch.cat([p, n]))))


def _feed(m, steps, *, loss_tri, acc, spread, start=1):
    """Feed ``steps`` steps whose health figures are the given ones."""
    figures = {"triplet_acc": torch.tensor(acc), "active_frac": torch.tensor(1.0), "emb_spread": torch.tensor(spread)}
    for step in range(start, start + steps):
        m.update(step, {"loss_tri": torch.tensor(loss_tri)}, figures)


@pytest.fixture(autouse=True)
def _figures_as_given(monkeypatch, request):
    """In the monitor's unit tests ``outputs`` are the figures themselves."""
    if "bench" not in request.fixturenames:
        monkeypatch.setattr(health_module, "triplet_health", lambda outputs, distance, margin: outputs)


def monitor(**kw):
    return HealthMonitor(distance=TripletLoss(margin=1.0, distance="euclidean").pair_distance, **{"on_collapse": "warn", "log_every": 10,
                                                                  "patience": 100, **kw})


def test_monitor_alarms_once_after_patience(caplog):
    m = monitor(margin=1.0, log_every=10, patience=50)
    with caplog.at_level(logging.WARNING, logger="train"):
        _feed(m, 40, loss_tri=1.0, acc=0.5, spread=0.3)  # pinned at the margin, but not for 50 steps yet
        assert not m.alarmed
        _feed(m, 200, loss_tri=1.0, acc=0.5, spread=0.3, start=41)
    assert m.alarmed and not m.stop_requested
    alarms = [r.getMessage() for r in caplog.records if "since step" in r.getMessage()]
    assert len(alarms) == 1
    # the embeddings are apart (spread 0.3): not a collapse, the triplets are just not learnt
    assert alarms[0].startswith("training is NOT LEARNING") and "since step 1 (now step 50)" in alarms[0]
    assert health_module.alarm_in(alarms[0]) == "not learning"


def test_monitor_no_alarm_for_a_start_above_the_margin_or_a_learning_run():
    m = monitor(margin=1.0, log_every=10, patience=30)
    _feed(m, 100, loss_tri=1.6, acc=0.5, spread=0.5)  # random init: loss above the margin
    _feed(m, 100, loss_tri=0.6, acc=0.8, spread=0.4, start=101)  # learning
    assert not m.alarmed
    # An interrupted stretch starts over: 20 collapsed steps, 10 healthy, 20 collapsed (patience 30).
    _feed(m, 20, loss_tri=1.0, acc=0.5, spread=0.01, start=201)
    _feed(m, 10, loss_tri=0.5, acc=0.9, spread=0.5, start=221)
    _feed(m, 20, loss_tri=1.0, acc=0.5, spread=0.01, start=231)
    assert not m.alarmed


def test_monitor_stop_mode_and_epoch_means():
    m = monitor(margin=0.2, on_collapse="stop", log_every=5, patience=10)
    _feed(m, 10, loss_tri=0.5, acc=0.5, spread=0.001)  # spread near zero collapses whatever the loss
    assert m.stop_requested
    means = m.epoch_means()
    assert means == pytest.approx({"triplet_acc": 0.5, "active_frac": 1.0, "emb_spread": 0.001})
    assert m.epoch_means() == {}
    with pytest.raises(ValueError, match="on_collapse"):
        monitor(margin=1.0, on_collapse="panic")


def test_unknown_on_collapse_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        train.get_args_parser().parse_args(["--on_collapse", "panic"])
    assert exc.value.code == 2
    assert "--on_collapse" in capsys.readouterr().err


RUN = {"datasetLen": 32, "batch_size": 4, "log_every": 2}  # 8 steps per epoch, health figures every 2


def test_forced_collapse_stops_with_checkpoint(bench, tmp_path, monkeypatch, caplog):
    """Final LayerNorm at zero: every embedding is the same point, the triplet loss equals the margin."""
    import models

    real_build = models.build_model

    def collapsed_model(args, **kw):
        model = real_build(args, **kw)
        norm = model.encoder.vit.norm
        torch.nn.init.zeros_(norm.weight)
        torch.nn.init.zeros_(norm.bias)
        norm.requires_grad_(False)
        return model

    monkeypatch.setattr(models, "build_model", collapsed_model)
    with caplog.at_level(logging.WARNING, logger="train"), pytest.raises(SystemExit) as exc:
        train.main(train_args(bench, tmp_path, "collapse", "--epoch", "3", "--on_collapse", "stop",
                              "--collapse_patience", "6", **RUN))
    assert exc.value.code == 2
    alarm = [r.getMessage() for r in caplog.records if "COLLAPSED" in r.getMessage()]
    assert len(alarm) == 1 and "embedding spread 0.0000" in alarm[0]
    assert health_module.alarm_in(alarm[0]) == "collapsed" and "NOT LEARNING" not in alarm[0]
    folder = tmp_path / "collapse"
    assert "COLLAPSED" in (folder / "train.log").read_text()
    ckpt = torch.load(folder / "checkpoint.pth", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["next_epoch"] == 0 and ckpt["skip_batches"] == 6


def test_run_logs_health_figures(bench, tmp_path):
    train.main(train_args(bench, tmp_path, "healthy", "--epoch", "2", **RUN))
    lines = [json.loads(l) for l in (tmp_path / "healthy" / "log.txt").read_text().splitlines()]
    for line in lines:
        assert 0.0 <= line["train_triplet_acc"] <= 1.0
        assert 0.0 <= line["train_active_frac"] <= 1.0
        assert 0.0 < line["train_emb_spread"] <= 1.0, line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "healthy" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"health/triplet_acc", "health/active_frac", "health/emb_spread"} <= set(tags)
    assert [e.step for e in acc.Scalars("health/emb_spread")] == [2, 4, 6, 8, 10, 12, 14, 16]
