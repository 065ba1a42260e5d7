"""The paper's model (``b16``) computes exactly the pinned losses and gradients on a fixed batch.

The fixture (``tests/fixtures/b16_pinned.json``) holds, for a seeded b16 PuXIM (random init, no CLIP: the
keep-mask comes in the batch) and a seeded batch of 2 triplets at 224x224, the criterion's terms and, per
trainable parameter, the sum and the sum of squares of its gradient (float64 of the fp32 gradient), in
training mode with dropout drawn from a fixed seed. Changes to code around the paper's path (presets'
training aids, refactors) must leave every one of these numbers bit for bit as it is: atol 0, CPU, fp32,
one thread. Both variants are pinned: ``puxim`` (masked, Euclidean triplet) on 2 triplets and ``non-mask``
(unmasked, cosine triplet) on 1, which halves its cost (a ViT-B/16 step takes ~10 s a triplet here).

Regenerate (only for an intended change of the paper's numbers, saying why in the commit):
    HF_HUB_OFFLINE=1 .venv/bin/python tests/test_b16_pinned.py --write
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import build_criterion  # noqa: E402
from models import build_model  # noqa: E402
from utils.config import make_config

FIXTURE = Path(__file__).with_name("fixtures") / "b16_pinned.json"
VARIANTS = {"puxim": 2, "non-mask": 1}  # variant -> triplets in the batch
SIZE, NUM_PATCHES = 224, 196


def _batch(b: int) -> dict:
    g = torch.Generator().manual_seed(1234)
    images = lambda: torch.rand(b, 3, SIZE, SIZE, generator=g) * 2 - 1  # noqa: E731  [B, 3, 224, 224]
    batch = dict(sketch=images(), positive=images(), negative=images(),
                 positive_class=["cat", "dog"][:b], negative_class=["car", "cup"][:b])
    batch["photo_mask"] = torch.randint(0, 2, (2 * b, NUM_PATCHES), generator=g).float()  # [2B, N] of 0/1
    return batch


def _model(variant: str):
    torch.manual_seed(0)
    return build_model(make_config("b16", variant=variant, vit_weights=None), with_sampler=False).train()


def pinned_values(variant: str, model=None) -> dict:
    """The terms and per-parameter gradient sums of one training step's forward and backward."""
    model = _model(variant) if model is None else model
    criterion = build_criterion(make_config("b16", variant=variant))
    torch.manual_seed(7)  # dropout (0.1 in b16) draws from here
    losses = criterion(model(_batch(VARIANTS[variant])))
    losses["loss"].backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.double()
            grads[name] = [g.sum().item(), (g * g).sum().item()]
    return {"losses": {k: v.item() for k, v in losses.items()}, "grads": grads}


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_b16_losses_and_gradients_are_the_pinned_ones(variant, one_thread):
    expected = json.loads(FIXTURE.read_text())[variant]
    got = pinned_values(variant)
    assert got["losses"] == expected["losses"]  # exact: atol 0
    assert sorted(got["grads"]) == sorted(expected["grads"])  # every trainable parameter got its gradient
    changed = {k: (got["grads"][k], v) for k, v in expected["grads"].items() if got["grads"][k] != v}
    assert not changed, f"{len(changed)} gradients differ, e.g. {dict(list(changed.items())[:3])}"


def _write() -> None:
    torch.set_num_threads(1)
    FIXTURE.write_text(json.dumps({v: pinned_values(v) for v in VARIANTS}, indent=0, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    _write()
