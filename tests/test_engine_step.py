"""engine.train_step, the one training step: what a hand-written step does, and what train_one_epoch takes."""
import copy
from types import SimpleNamespace

import pytest
import torch

import engine
from losses import build_criterion
from models import build_model

B = 2


@pytest.fixture(scope="module")
def model():
    """Tiny PuXIM with dropout, so that a step that drew its random numbers differently would show."""
    torch.manual_seed(0)
    return build_model(SimpleNamespace(arch="tiny", dropout=0.1)).train()


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
    criterion = build_criterion(SimpleNamespace())
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
    criterion = build_criterion(SimpleNamespace())
    batches = [make_batch(model, seed=s) for s in (2, 3)]

    stepped = copy.deepcopy(model)
    opt = adam(stepped)
    torch.manual_seed(11)
    step_losses = [engine.train_step(stepped, criterion, dict(b), opt)[0] for b in batches]

    looped = copy.deepcopy(model)
    torch.manual_seed(11)
    stats = engine.train_one_epoch(looped, criterion, [dict(b) for b in batches], adam(looped),
                                   device=torch.device("cpu"), epoch=0, global_step=5, progress=False)
    assert_same(params(looped), params(stepped))
    assert stats["steps"] == 2 and stats["global_step"] == 7 and not stats["interrupted"]
    assert stats["loss"] == pytest.approx(sum(float(l["loss"].detach()) for l in step_losses) / 2, rel=0, abs=0)


def test_grad_scaler_path_gives_the_same_step(model):
    """A power-of-two loss scale is exact: the scaled step (fp16 training's path) lands on the same weights."""
    criterion = build_criterion(SimpleNamespace())
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
