"""engine.train_step, the one training step: what a hand-written step does, and what train_one_epoch takes;
what train_one_epoch and evaluate return."""
import copy

import pytest
import torch

import engine
from losses import build_criterion
from models import build_model
from conftest import tiny_config  # tests/ is on sys.path
from utils.config import make_config

B = 2


@pytest.fixture(scope="module")
def model():
    """Tiny PuXIM with dropout, so that a step that drew its random numbers differently would show."""
    torch.manual_seed(0)
    return build_model(tiny_config(dropout=0.1)).train()


def make_batch(model, seed):
    size = model.sampler.image_size
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.rand(B, 3, size, size, generator=g) * 2 - 1  # noqa: E731
    return dict(sketch=img(), positive=img(), negative=img(),
                positive_class=["cat", "dog"], negative_class=["car", "cup"])


def adam(model):
    return torch.optim.Adam(model.trainable_parameters(), lr=1e-3, weight_decay=1e-3)


def params(model):
    return [p.detach().clone() for p in model.trainable_parameters()]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=0, atol=0)


def test_train_step_is_the_hand_written_step(model):
    criterion = build_criterion(make_config("b16"))
    batch = make_batch(model, seed=1)
    before = params(model)

    by_hand = copy.deepcopy(model)
    opt = adam(by_hand)
    torch.manual_seed(7)
    out = by_hand(batch)
    losses = criterion(out)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    rng_by_hand = torch.get_rng_state()

    stepped = copy.deepcopy(model)
    torch.manual_seed(7)
    step_losses, step_out = engine.train_step(stepped, criterion, batch, adam(stepped),
                                              device=torch.device("cpu"), step=1)
    rng_stepped = torch.get_rng_state()
    assert_same(params(stepped), params(by_hand))
    assert not all(torch.equal(p, q) for p, q in zip(params(stepped), before))  # the step moved the weights
    assert set(step_losses) == set(losses) and torch.equal(step_losses["loss"], losses["loss"])
    assert step_out.keys() == out.keys() and torch.equal(step_out["sketch_emb"], out["sketch_emb"])
    assert torch.equal(rng_stepped, rng_by_hand)  # the same random numbers drawn (dropout)


def test_train_one_epoch_takes_train_step_per_batch(model):
    criterion = build_criterion(make_config("b16"))
    batches = [make_batch(model, seed=s) for s in (2, 3)]

    stepped = copy.deepcopy(model)
    opt = adam(stepped)
    torch.manual_seed(11)
    step_losses = [engine.train_step(stepped, criterion, dict(b), opt)[0] for b in batches]

    looped = copy.deepcopy(model)
    torch.manual_seed(11)
    loop = engine.TrainLoop(looped, criterion, adam(looped), torch.device("cpu"), progress=False)
    result = engine.train_one_epoch(loop, [dict(b) for b in batches], epoch=0, global_step=5)
    assert_same(params(looped), params(stepped))
    assert result.steps_taken == 2 and result.global_step == 7 and not result.interrupted
    assert result.stats["steps"] == 2  # no carry: the whole epoch is this call
    assert result.stats["loss"] == pytest.approx(sum(float(l["loss"].detach()) for l in step_losses) / 2,
                                                 rel=0, abs=0)


def test_grad_scaler_path_gives_the_same_step(model):
    """A power-of-two loss scale is exact: the scaled step (fp16 training's path) lands on the same weights."""
    criterion = build_criterion(make_config("b16"))
    batch = make_batch(model, seed=4)
    plain, scaled = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(3)
    engine.train_step(plain, criterion, batch, adam(plain))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    torch.manual_seed(3)
    engine.train_step(scaled, criterion, batch, adam(scaled), scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow, step taken
    assert_same(params(scaled), params(plain))


def test_non_finite_loss_stops_before_touching_the_weights(model):
    net = copy.deepcopy(model)
    opt = adam(net)
    before = params(net)

    def nan_criterion(outputs):
        return {"loss": outputs["sketch_emb"].sum() * float("nan"), "loss_tri": torch.tensor(1.0)}

    with pytest.raises(engine.NonFiniteLossError, match="non-finite loss at optimizer step 42") as err:
        engine.train_step(net, nan_criterion, make_batch(model, seed=5), opt, step=42)
    assert err.value.step == 42 and err.value.terms["loss_tri"] == 1.0
    assert_same(params(net), before)
    assert all(p.grad is None for p in net.trainable_parameters())


CONTROL_KEYS = {"interrupted", "collapsed", "global_step", "partial", "epoch_steps"}


def assert_statistics(stats):
    """Numbers only (a bool is a control value, not a statistic), none of the result's control values."""
    assert not CONTROL_KEYS & set(stats)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats.values()), stats


def test_epoch_result_keeps_statistics_apart_from_control_values(model):
    """An interrupted epoch and its resumption: stats hold the whole epoch's numbers, the result the control."""
    from utils.health import HealthMonitor

    criterion = build_criterion(make_config("b16"))
    batches = [make_batch(model, seed=s) for s in (6, 7, 8)]
    net = copy.deepcopy(model)
    health = HealthMonitor(distance=criterion.triplet.pair_distance, margin=criterion.triplet.margin,
                           on_collapse="warn", log_every=10, patience=100)
    stop = [True]
    loop = engine.TrainLoop(net, criterion, adam(net), torch.device("cpu"), progress=False, health=health,
                            should_stop=lambda: stop[0])

    first = engine.train_one_epoch(loop, [dict(b) for b in batches], epoch=0, global_step=10)
    assert first.interrupted and not first.collapsed and first.steps_taken == 1 and first.global_step == 11
    assert first.partial["steps"] == 1 and first.stats["steps"] == 1
    assert_statistics(first.stats)
    assert "triplet_acc" not in first.stats  # an interrupted epoch's health sums go into the checkpoint

    stop[0] = False
    rest = engine.train_one_epoch(loop, [dict(b) for b in batches[1:]], epoch=0, global_step=first.global_step,
                                  carry=first.partial)
    assert not rest.interrupted and not rest.collapsed and rest.steps_taken == 2 and rest.global_step == 13
    assert rest.stats["steps"] == rest.partial["steps"] == 3  # the whole epoch, across the interruption
    assert rest.stats["loss"] == pytest.approx(rest.partial["sums"]["loss"] / 3, rel=0, abs=0)
    assert rest.partial["sums"]["loss"] > first.partial["sums"]["loss"]  # the first part carried in
    assert_statistics(rest.stats)
    assert {"loss", "loss_tri", "lr", "epoch_time", "samples_per_s", "steps",
            "triplet_acc", "active_frac", "emb_spread"} <= set(rest.stats)


def test_eval_result_keeps_features_and_unreadable_items_out_of_the_metrics():
    class Model(torch.nn.Module):
        def encode(self, images, modality):
            return images.flatten(1)[:, :4]  # [b, 4]

    def loader(ok, prefix):
        n = len(ok)
        return [{"image": torch.rand(n, 3, 2, 2), "label": torch.arange(n) % 2, "index": torch.arange(n),
                 "ok": torch.tensor(ok), "path": [f"/{prefix}/{i}.png" for i in range(n)],
                 "errors": [f"/{prefix}/{i}.png: truncated" for i in range(n)]}]

    result = engine.evaluate(Model(), loader([True, True, False], "q"), loader([True] * 4, "g"),
                             device=torch.device("cpu"), class_names=["cat", "dog"], progress=False,
                             return_features=True)
    assert not [k for k in result.metrics if k.startswith("_")]
    assert result.metrics["num_queries"] == 2 and result.metrics["num_queries_unreadable"] == 1
    assert set(result.metrics["per_class"]) == {"cat", "dog"}
    assert result.unreadable == {"queries": [("/q/2.png", "/q/2.png: truncated")], "gallery": []}
    assert result.features["query"].shape == (2, 4) and result.features["gallery"].shape == (4, 4)
    assert result.features["gallery_labels"].tolist() == [0, 1, 0, 1]

    without = engine.evaluate(Model(), loader([True, True], "q"), loader([True] * 4, "g"),
                              device=torch.device("cpu"), progress=False)
    assert without.features is None and without.unreadable == {"queries": [], "gallery": []}
    assert not [k for k in without.metrics if k.startswith("_")]
