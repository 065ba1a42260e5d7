"""Every loss on hand-made tensors against hand-computed numbers."""
import math

import pytest
import torch

from losses import (InstanceLoss, MatchingLoss, PuXIMCriterion, ReconstructionLoss, SeenClassLoss, TripletLoss,
                    build_criterion, symmetric_infonce)
from utils.config import ConfigError, make_config

PAPER_WEIGHTS = {"loss_tri": 1.0, "loss_rec": 0.05, "loss_int": 0.1}  # w_tri, w_rec, w_int of the paper


def paper(**settings):
    """The b16 preset's configuration (the paper's losses), ``settings`` changed (checked as train.py checks)."""
    return make_config("b16", **settings)


def test_triplet_euclidean_by_hand():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    p = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    n = torch.tensor([[1.0, 0.0], [4.0, 5.0]])
    # sample 1: d(a,p) = 5, d(a,n) = 1 -> 5 - 1 + 1 = 5; sample 2: 0 - 5 + 1 < 0 -> 0; mean 2.5
    # (torch adds eps = 1e-6 inside the norm: differences below 1e-5)
    loss = TripletLoss(margin=1.0, distance="euclidean")(a, p, n)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(2.5, abs=1e-5)
    assert TripletLoss(margin=3.0, distance="euclidean")(a, p, n).item() == pytest.approx((7.0 + 0.0) / 2, abs=1e-5)


def test_triplet_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    n = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    # sample 1: d(a,p) = 1 - 0 = 1, d(a,n) = 1 - 1/sqrt(2) -> 1 - (1 - 0.70711) + 0.2 = 0.90711
    # sample 2: d(a,p) = 0, d(a,n) = 2 -> 0 - 2 + 0.2 < 0 -> 0
    loss = TripletLoss(margin=0.2, distance="cosine")(a, p, n)
    assert loss.item() == pytest.approx((1 / math.sqrt(2) + 0.2) / 2, abs=1e-6)  # 0.453553
    with pytest.raises(ValueError, match="distance"):
        TripletLoss(margin=1.0, distance="manhattan")


def test_reconstruction_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]],
                      [[5.0, 6.0], [7.0, 8.0]]], requires_grad=True)  # [2B=2, N=2, D=2]
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # masked tokens: (3, 4) and (5, 6): 9 + 16 + 25 + 36 = 86 over 8 elements
    loss = ReconstructionLoss()(x, m)
    assert loss.item() == pytest.approx(86 / 8)
    loss.backward()
    # d/dX mean((X - X*M)^2) = 2 (1-M)^2 X / 8 = (1-M) X / 4 for a 0/1 mask
    expected = torch.tensor([[[0.0, 0.0], [0.75, 1.0]], [[1.25, 1.5], [0.0, 0.0]]])
    torch.testing.assert_close(x.grad, expected)


def test_reconstruction_gradient_flows_through_both_sides():
    # With a soft mask the two readings differ: through both sides d/dx (x - m x)^2 = 2 (1-m)^2 x,
    # with the target detached it would be 2 (1-m) x.
    x = torch.tensor([[[2.0]]], requires_grad=True)
    m = torch.tensor([[0.5]])
    loss = ReconstructionLoss()(x, m)
    assert loss.item() == pytest.approx(1.0)  # (2 - 1)^2
    loss.backward()
    assert x.grad.item() == pytest.approx(2 * 0.25 * 2.0)
    with pytest.raises(ValueError, match="mask"):
        ReconstructionLoss()(torch.zeros(2, 3, 4), torch.zeros(2, 4))


def test_matching_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0])
    # row 1: -log(e^0 / (e^2 + e^0)) = log(1 + e^2) = 2.126928; row 2: log 2 = 0.693147
    assert MatchingLoss()(logits, labels).item() == pytest.approx((2.126928 + 0.693147) / 2, abs=1e-6)


def _outputs():
    return {
        "sketch_emb": torch.tensor([[0.0, 0.0]]),
        "positive_emb": torch.tensor([[3.0, 4.0]]),
        "negative_emb": torch.tensor([[1.0, 0.0]]),
        "photo_patch_tokens": torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]),
        "photo_mask": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "match_logits": torch.tensor([[2.0, 0.0], [0.0, 0.0]]),
        "match_labels": torch.tensor([1, 0]),
    }


def test_criterion_by_hand():
    crit = PuXIMCriterion(triplet=TripletLoss(margin=1.0, distance="euclidean"), weights=PAPER_WEIGHTS)
    assert crit.weight_dict == {"loss_tri": 1.0, "loss_rec": 0.05, "loss_int": 0.1}
    out = crit(_outputs())
    assert set(out) == {"loss_tri", "loss_rec", "loss_int", "loss"}
    tri, rec, ce = 5.0, 86 / 8, (2.126928 + 0.693147) / 2
    assert out["loss_tri"].item() == pytest.approx(tri, abs=1e-5)
    assert out["loss_rec"].item() == pytest.approx(rec)
    assert out["loss_int"].item() == pytest.approx(ce, abs=1e-6)
    assert out["loss"].item() == pytest.approx(tri + 0.05 * rec + 0.1 * ce, abs=1e-5)  # 5.678204


def test_non_mask_criterion():
    crit = build_criterion(paper(variant="non-mask"))
    assert crit.triplet.distance == "cosine" and crit.triplet.margin == 0.2
    out = crit(_outputs())
    assert out["loss_rec"].item() == 0.0 and not out["loss_rec"].requires_grad
    # cosine triplet with a = 0: cos = 0 both ways (torch clamps the norm), so 1 - 1 + 0.2 = 0.2
    assert out["loss_tri"].item() == pytest.approx(0.2, abs=1e-6)
    ce = (2.126928 + 0.693147) / 2
    assert out["loss"].item() == pytest.approx(0.2 + 0.1 * ce, abs=1e-6)


def test_build_criterion_defaults_and_overrides():
    crit = build_criterion(paper())
    assert crit.weight_dict == {"loss_tri": 1.0, "loss_rec": 0.05, "loss_int": 0.1}
    assert crit.triplet.distance == "euclidean" and crit.triplet.margin == 1.0 and crit.use_reconstruction
    crit = build_criterion(paper(margin=0.5, w_tri=2, w_int=0.3))
    assert crit.triplet.margin == 0.5
    assert crit.weight_dict == {"loss_tri": 2.0, "loss_rec": 0.05, "loss_int": 0.3}
    with pytest.raises(ConfigError, match="variant must be one of"):
        build_criterion(paper(variant="mae"))


def test_seen_class_term_by_hand():
    out = dict(_outputs(), class_logits=torch.tensor([[2.0, 0.0], [0.0, 0.0]]), class_labels=torch.tensor([0, 1]))
    crit = build_criterion(paper(w_cls=0.5, tri_distance="cosine"))
    assert crit.weight_dict == {"loss_tri": 1.0, "loss_rec": 0.05, "loss_int": 0.1, "loss_cls": 0.5}
    assert crit.triplet.distance == "cosine" and crit.triplet.margin == 0.2  # cosine's default margin
    losses = crit(out)
    cls = (0.126928 + 0.693147) / 2  # -log softmax: log(1 + e^-2) and log 2
    assert losses["loss_cls"].item() == pytest.approx(cls, abs=1e-6)
    # cosine triplet with a = 0: 0.2 (see test_non_mask_criterion); rec 86/8; int as in test_criterion_by_hand
    ce = (2.126928 + 0.693147) / 2
    assert losses["loss"].item() == pytest.approx(0.2 + 0.05 * 86 / 8 + 0.1 * ce + 0.5 * cls, abs=1e-5)
    assert "loss_cls" not in build_criterion(paper(w_cls=0.0))(out)  # 0: no term at all
    with pytest.raises(ValueError, match="class_logits"):
        crit(_outputs())
    with pytest.raises(ConfigError, match="tri_distance must be one of"):
        build_criterion(paper(tri_distance="manhattan"))
    with pytest.raises(ValueError, match="exactly the keys"):
        PuXIMCriterion(triplet=crit.triplet, weights={"loss_tri": 1.0, "loss_rec": 0.0, "loss_int": 0.0,
                                                      "loss_typo": 1.0})
    with pytest.raises(ConfigError, match="w_cls must be >= 0"):
        build_criterion(paper(w_cls=-1.0))


def test_extra_losses_are_plug_ins_with_their_weights():
    """The criterion is built with its plug-ins; each returns its terms and carries their weights."""
    out = dict(_outputs(), class_logits=torch.tensor([[2.0, 0.0], [0.0, 0.0]]), class_labels=torch.tensor([0, 1]))
    seen = SeenClassLoss(0.5)
    assert seen.weight_dict == {"loss_cls": 0.5} and set(seen(out)) == {"loss_cls"}
    crit = PuXIMCriterion(triplet=TripletLoss(margin=0.2, distance="cosine"), weights=PAPER_WEIGHTS,
                          extra_losses=[seen])
    assert crit.weight_dict == {"loss_tri": 1.0, "loss_rec": 0.05, "loss_int": 0.1, "loss_cls": 0.5}
    built = build_criterion(paper(w_cls=0.5, tri_distance="cosine"))(out)
    assert {k: v.item() for k, v in crit(out).items()} == {k: v.item() for k, v in built.items()}
    # the paper's criterion has no plug-ins: build_criterion adds one only for a weight > 0
    assert list(build_criterion(paper()).extra_losses) == []
    assert [type(m) for m in build_criterion(paper(w_cls=1.0, w_inst=2.0)).extra_losses] == [
        SeenClassLoss, InstanceLoss]
    with pytest.raises(ValueError, match="already has"):
        PuXIMCriterion(triplet=crit.triplet, weights=PAPER_WEIGHTS, extra_losses=[SeenClassLoss(1.0), SeenClassLoss(2.0)])


def test_instance_term_by_hand():
    # sketches (1, 0), (1, 1) against photos (1, 0), (0, 1): cosines [[1, 0], [1/sqrt2, 1/sqrt2]], over 0.1.
    sketch, photo = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    rows = (math.log1p(math.exp(-10)) + math.log(2)) / 2  # sketch -> photo: the second row is a tie
    d = 10 - 10 / math.sqrt(2)
    cols = (math.log1p(math.exp(-d)) + math.log1p(math.exp(-10 / math.sqrt(2)))) / 2  # photo -> sketch
    assert symmetric_infonce(sketch, photo).item() == pytest.approx((rows + cols) / 2, abs=1e-6)  # 0.186529
    with pytest.raises(ValueError, match="temperature"):
        InstanceLoss(1.0, temperature=0.0)

    out = dict(_outputs(), positive_emb=photo, pseudo_sketch_emb=sketch, sketch_emb=torch.zeros(2, 2),
               negative_emb=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    crit = build_criterion(paper(w_inst=0.5, tri_distance="cosine"))
    assert crit.weight_dict == {"loss_tri": 1.0, "loss_rec": 0.05, "loss_int": 0.1, "loss_inst": 0.5}
    losses = crit(out)
    assert losses["loss_inst"].item() == pytest.approx((rows + cols) / 2, abs=1e-6)
    others = sum(crit.weight_dict[k] * losses[k] for k in ("loss_tri", "loss_rec", "loss_int"))
    assert losses["loss"].item() == pytest.approx(others.item() + 0.5 * losses["loss_inst"].item(), abs=1e-6)
    assert "loss_inst" not in build_criterion(paper(w_inst=0.0))(out)
    with pytest.raises(ValueError, match="pseudo_sketch"):
        crit(_outputs())
