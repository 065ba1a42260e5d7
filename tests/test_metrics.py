"""utils.metrics: hand-worked cases, a plain per-rank reference, ties, chunking, input types."""
import math

import numpy as np
import pytest
import torch

import utils.metrics as metrics_module
from utils.metrics import (
    MetricsInputError,
    _ranks_by_stable_sort,
    metric_conventions,
    metrics_from_ranks,
    relevant_ranks,
    retrieval_metrics,
)

# --------------------------------------------------------------------------------------------------
# A 6-item gallery worked out on paper.
#
# Gallery item i has the one-hot feature e_i, so a query's cosine similarity to item i is its i-th
# feature divided by its norm: the query feature *is* its score vector (order preserved, exact).
#
#   gallery index    g0   g1   g2   g3   g4   g5
#   gallery label     0    1    0    1    0    2
#
# Queries A-D share the scores [0.2, 0.9, 0.7, 0.5, 0.8, 0.1]  -> ranking g1 g4 g2 g3 g0 g5.
#   A (label 0): relevance along the ranking 0 1 1 0 1 0 -> relevant ranks 2, 3, 5 (R = 3)
#       AP@all   = (1/2 + 2/3 + 3/5) / 3                        = 53/90
#       AP@3     = torchmetrics: relevant inside top 3 are ranks 2, 3 -> (1/2 + 2/3) / 2 = 7/12
#       AP@3 SAKE: precision at ranks 1..3 = 0, 1/2, 2/3; interpolated at rank 2 = max(1/2, 2/3)
#                  = 2/3, at rank 3 = 2/3; divided by min(3, R=3): (2/3 + 2/3) / 3 = 4/9
#       AP@all SAKE: interpolated at ranks 2, 3, 5 = 2/3, 2/3, 3/5 -> (2/3+2/3+3/5)/3 = 29/45
#       P@2 = 1/2, P@4 = 2/4;  ZSE P@2: top min(2,3)=2 -> 1/2;  ZSE P@4: top min(4,3)=3 -> 2/3
#   B (label 1): relevance 1 0 0 1 0 0 -> ranks 1, 4 (R = 2)
#       AP@all = (1/1 + 2/4) / 2 = 3/4;  AP@3 = 1 (only rank 1 inside);  AP@3 SAKE: interpolated
#       at rank 1 = 1, divided by min(3, 2) = 2 -> 1/2;  AP@all SAKE = (1 + 1/2) / 2 = 3/4
#       P@2 = 1/2, P@4 = 2/4;  ZSE P@2 = 1/2 (top 2);  ZSE P@4 = 1/2 (top min(4,2)=2)
#   C (label 2): relevant rank 6 only (R = 1): none in the top 3 or top 4
#       AP@all = 1/6;  AP@3 = 0;  AP@3 SAKE = 0;  AP@all SAKE = 1/6;  P@2 = P@4 = 0; ZSE P = 0
#   D (label 3): no relevant gallery item: 0 for the torchmetrics keys, left out of SAKE/ZSE means
# Query E (label 1) has scores [0.1, 0.8, 0.2, 0.9, 0.3, 0.4] -> ranking g3 g1 g5 g4 g2 g0:
#   relevant ranks 1, 2 (all relevant inside the top K): AP@all = AP@3 = SAKE = 1;
#       P@2 = 1, P@4 = 2/4; ZSE P@2 = 1, ZSE P@4 = 1 (top min(4,2)=2)
# --------------------------------------------------------------------------------------------------
GALLERY_LABELS = [0, 1, 0, 1, 0, 2]
SCORES_ABCD = [0.2, 0.9, 0.7, 0.5, 0.8, 0.1]
SCORES_E = [0.1, 0.8, 0.2, 0.9, 0.3, 0.4]
QUERY_LABELS = [0, 1, 2, 3, 1]


def _hand_case():
    q = torch.tensor([SCORES_ABCD] * 4 + [SCORES_E])
    g = torch.eye(6)
    return q, torch.tensor(QUERY_LABELS), g, torch.tensor(GALLERY_LABELS)


def test_hand_worked_gallery():
    m = retrieval_metrics(*_hand_case(), ks_map=(3,), ks_precision=(2, 4), per_class=True)
    A, B, C, D, E = 53 / 90, 3 / 4, 1 / 6, 0.0, 1.0
    assert m["mAP@all"] == pytest.approx((A + B + C + D + E) / 5, abs=1e-12)
    assert m["mAP@3"] == pytest.approx((7 / 12 + 1 + 0 + 0 + 1) / 5, abs=1e-12)
    assert m["P@2"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 0 + 1) / 5, abs=1e-12)
    assert m["P@4"] == pytest.approx((2 / 4 + 2 / 4 + 0 + 0 + 2 / 4) / 5, abs=1e-12)
    # SAKE / ZSE-SBIR keys leave D (no relevant item) out of the mean: 4 queries.
    assert m["mAP@3_sake"] == pytest.approx((4 / 9 + 1 / 2 + 0 + 1) / 4, abs=1e-12)
    assert m["mAP@all_sake"] == pytest.approx((29 / 45 + 3 / 4 + 1 / 6 + 1) / 4, abs=1e-12)
    assert m["P@2_zse"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 1) / 4, abs=1e-12)
    assert m["P@4_zse"] == pytest.approx((2 / 3 + 1 / 2 + 0 + 1) / 4, abs=1e-12)
    assert m["num_queries"] == 5.0 and m["num_gallery"] == 6.0
    assert m["num_queries_without_relevant"] == 1.0
    assert m["per_class"] == pytest.approx({0: A, 1: (B + E) / 2, 2: C, 3: 0.0}, abs=1e-12)


def test_per_query_values_from_hand_ranks():
    # Ranks of A, B, C, E from the table above, fed straight to metrics_from_ranks.
    cases = {  # ranks: (AP@all, AP@3, AP@3 SAKE, AP@all SAKE, P@2, P@4, ZSE P@2, ZSE P@4)
        (2, 3, 5): (53 / 90, 7 / 12, 4 / 9, 29 / 45, 1 / 2, 2 / 4, 1 / 2, 2 / 3),
        (1, 4): (3 / 4, 1, 1 / 2, 3 / 4, 1 / 2, 2 / 4, 1 / 2, 1 / 2),
        (6,): (1 / 6, 0, 0, 1 / 6, 0, 0, 0, 0),
        (1, 2): (1, 1, 1, 1, 1, 2 / 4, 1, 1),
    }
    keys = ("mAP@all", "mAP@3", "mAP@3_sake", "mAP@all_sake", "P@2", "P@4", "P@2_zse", "P@4_zse")
    for ranks, expected in cases.items():
        out = metrics_from_ranks(torch.tensor([ranks]), 6, ks_map=(3,), ks_precision=(2, 4))
        got = tuple(out[k].item() for k in keys)
        assert got == pytest.approx(expected, abs=1e-12), ranks
    # No relevant item: zeros for torchmetrics' keys, NaN (= left out) for SAKE/ZSE.
    out = metrics_from_ranks(torch.zeros((2, 0), dtype=torch.long), 6, ks_map=(3,), ks_precision=(2,))
    assert out["mAP@all"].tolist() == [0.0, 0.0] and out["mAP@3"].tolist() == [0.0, 0.0]
    assert out["P@2"].tolist() == [0.0, 0.0]
    assert all(math.isnan(v) for k in ("mAP@3_sake", "mAP@all_sake", "P@2_zse") for v in out[k].tolist())


def test_gallery_smaller_than_k():
    # Query A alone with K = 10 > 6 gallery items: P@10 divides by 10 (torchmetrics'
    # adaptive_k=False), mAP@10 is AP over the whole ranking, SAKE caps top at the gallery size.
    q, ql, g, gl = _hand_case()
    m = retrieval_metrics(q[:1], ql[:1], g, gl, ks_map=(10,), ks_precision=(10,))
    assert m["P@10"] == pytest.approx(3 / 10, abs=1e-12)
    assert m["mAP@10"] == pytest.approx(53 / 90, abs=1e-12)
    assert m["mAP@10_sake"] == pytest.approx(29 / 45, abs=1e-12)
    assert m["P@10_zse"] == pytest.approx(2 / 3, abs=1e-12)  # top min(10, R=3) = 3 holds ranks 2, 3


# --------------------------------------------------------------------------------------------------
# Ties: equal scores keep gallery order (stable sort of -similarity).
# Query label 0, scores [0.5, 0.5, 0.9, 0.5, 0.1, 0.5], gallery labels [1, 0, 1, 0, 0, 1]:
#   ranking g2 (0.9) | g0 g1 g3 g5 (tied 0.5, gallery order) | g4 (0.1)
#   relevance          0 | 0 1 1 0 | 1  -> ranks 3, 4, 6 -> AP@all = (1/3 + 2/4 + 3/6) / 3 = 4/9
#   (relevant-first tie breaking would give ranks 2, 3, 6 and AP 5/9.)
# --------------------------------------------------------------------------------------------------
def test_ties_keep_gallery_order():
    q = torch.tensor([[0.5, 0.5, 0.9, 0.5, 0.1, 0.5]])
    g, gl = torch.eye(6), torch.tensor([1, 0, 1, 0, 0, 1])
    sims = torch.nn.functional.normalize(q, dim=1) @ g.T
    rel = torch.tensor([1, 3, 4])
    for backend in ("numpy", "torch"):
        assert relevant_ranks(sims, rel, backend=backend).tolist() == [[3, 4, 6]]
    m = retrieval_metrics(q, torch.tensor([0]), g, gl, ks_map=(4,), ks_precision=(4,))
    assert m["mAP@all"] == pytest.approx(4 / 9, abs=1e-12)
    assert m["mAP@4"] == pytest.approx((1 / 3 + 2 / 4) / 2, abs=1e-12)
    assert m["P@4"] == pytest.approx(2 / 4, abs=1e-12)


def test_many_ties_per_row_use_stable_sort():
    # All scores equal (collapsed features): the ranking is the gallery order itself; more than
    # 32 tied relevant items per row takes the stable-full-sort path.
    G = 100
    sims = torch.zeros(3, G)
    sims[1, 50:] = 1.0                                  # row 1: second half first, then first half
    rel = torch.arange(0, G, 2)                         # 50 relevant items
    expected_row0 = (rel + 1).tolist()
    expected_row1 = [r - 50 + 1 for r in rel.tolist() if r >= 50] + [r + 50 + 1 for r in rel.tolist() if r < 50]
    for backend in ("numpy", "torch"):
        ranks = relevant_ranks(sims, rel, backend=backend)
        assert ranks[0].tolist() == expected_row0 and ranks[2].tolist() == expected_row0
        assert ranks[1].tolist() == expected_row1


# --------------------------------------------------------------------------------------------------
# A plain per-query, per-rank reference, written with loops.
# --------------------------------------------------------------------------------------------------
def _plain_metrics(sims, q_labels, g_labels, ks_map, ks_precision):
    sums, counts = {}, {}

    def add(key, value):
        if value is not None:
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1

    G = len(g_labels)
    for i, label in enumerate(q_labels):
        row = sims[i]
        order = sorted(range(G), key=lambda gi: -row[gi])      # Python's sort is stable
        rel = [g_labels[gi] == label for gi in order]
        total = sum(rel)

        def ap_torchmetrics(top):
            hits, acc = 0, 0.0
            for rank in range(1, top + 1):
                if rel[rank - 1]:
                    hits += 1
                    acc += hits / rank
            return acc / hits if hits else 0.0

        def ap_sake(top):  # eval_AP_inner + VOCap, literally
            if total == 0:
                return None
            tot_pos = min(top, total)
            prec, hits = [], 0
            for rank in range(1, top + 1):
                hits += rel[rank - 1]
                prec.append(hits / rank)
            mpre = [0.0] + prec + [0.0]
            for k in range(len(mpre) - 2, -1, -1):
                mpre[k] = max(mpre[k], mpre[k + 1])
            rec = [0.0] + [sum(rel[:rank]) / tot_pos for rank in range(1, top + 1)] + [1.0]
            return sum((rec[k + 1] - rec[k]) * mpre[k + 1] for k in range(len(rec) - 1) if rec[k + 1] != rec[k])

        add("mAP@all", ap_torchmetrics(G))
        add("mAP@all_sake", ap_sake(G))
        for k in ks_map:
            add(f"mAP@{k}", ap_torchmetrics(min(k, G)))
            add(f"mAP@{k}_sake", ap_sake(min(k, G)))
        for k in ks_precision:
            add(f"P@{k}", sum(rel[:k]) / k)
            m = min(k, total)
            add(f"P@{k}_zse", sum(rel[:m]) / m if m else None)
    return {key: sums[key] / counts[key] for key in sums}


def _gaussian_data(seed, nq=300, ng=200, dim=16, classes=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    ql = rng.integers(0, classes, nq)
    gl = rng.integers(0, classes - 1, ng)              # the last class has no gallery item
    qf = centres[ql] + 1.2 * rng.normal(size=(nq, dim))
    gf = centres[gl] + 1.2 * rng.normal(size=(ng, dim))
    return qf.astype(np.float32), ql, gf.astype(np.float32), gl


def _sign_data(seed, nq=300, ng=200, dim=16, classes=5):
    # +-1 features in 16-d: normalised entries are exactly +-0.25, so every cosine is an exact
    # multiple of 1/8 in float32 whatever the summation order -- many exact ties, all reproducible.
    rng = np.random.default_rng(seed)
    centres = rng.choice([-1.0, 1.0], size=(classes, dim))
    flip = lambda n: rng.random((n, dim)) < 0.3
    ql, gl = rng.integers(0, classes, nq), rng.integers(0, classes, ng)
    qf = np.where(flip(nq), -centres[ql], centres[ql])
    gf = np.where(flip(ng), -centres[gl], centres[gl])
    return qf.astype(np.float32), ql, gf.astype(np.float32), gl


def _sims(qf, gf):
    q = torch.nn.functional.normalize(torch.from_numpy(qf), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(gf), dim=1)
    return (q @ g.T).tolist()


# Tied relevant items are resolved one by one, or, past _MAX_TIES_PER_ROW in a row, by a stable
# full sort of that row: max_ties 0 / 10**9 force one path or the other.
@pytest.mark.parametrize("max_ties", [None, 0, 10**9])
@pytest.mark.parametrize("backend", ["numpy", "torch"])   # torch: the GPU code path, run on the CPU
@pytest.mark.parametrize("make", [_gaussian_data, _sign_data])
def test_agrees_with_plain_loops(make, backend, max_ties, monkeypatch):
    if max_ties is not None:
        monkeypatch.setattr(metrics_module, "_MAX_TIES_PER_ROW", max_ties)
    qf, ql, gf, gl = make(0)
    ks_map, ks_precision = (20, 500), (10, 50)
    ours = retrieval_metrics(qf, ql, gf, gl, ks_map=ks_map, ks_precision=ks_precision, rank_backend=backend)
    plain = _plain_metrics(_sims(qf, gf), ql.tolist(), gl.tolist(), ks_map, ks_precision)
    assert set(plain) <= set(ours)
    for key, value in plain.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0.2 < ours["mAP@all"] < 0.95                # the data are neither trivial nor random


@pytest.mark.parametrize("max_ties", [None, 0, 10**9])
@pytest.mark.parametrize("decimals", [None, 3, 2])       # rounding the scores makes ties
@pytest.mark.parametrize("make", [_gaussian_data, _sign_data])
def test_backends_match_stable_sort(make, decimals, max_ties, monkeypatch):
    if max_ties is not None:
        monkeypatch.setattr(metrics_module, "_MAX_TIES_PER_ROW", max_ties)
    qf, ql, gf, gl = make(1, nq=64)
    sims = torch.tensor(_sims(qf, gf))
    if decimals is not None:
        sims = torch.round(sims, decimals=decimals)
    rel = torch.from_numpy(np.flatnonzero(gl == 0))
    exact = _ranks_by_stable_sort(sims, rel)
    assert torch.equal(relevant_ranks(sims, rel, backend="numpy"), exact)
    assert torch.equal(relevant_ranks(sims, rel, backend="torch"), exact)


@pytest.mark.parametrize("make", [_gaussian_data, _sign_data])
def test_chunk_size_does_not_change_results(make):
    qf, ql, gf, gl = make(2)
    results = [retrieval_metrics(qf, ql, gf, gl, chunk_size=c, per_class=True) for c in (1, 7, 10_000)]
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for key in results[0]:
            assert other[key] == pytest.approx(results[0][key], abs=1e-12, nan_ok=True), key


def test_torch_and_numpy_inputs_agree():
    qf, ql, gf, gl = _sign_data(3)
    a = retrieval_metrics(qf, ql, gf, gl, per_class=True)
    b = retrieval_metrics(torch.from_numpy(qf), torch.from_numpy(ql), torch.from_numpy(gf),
                          torch.from_numpy(gl), per_class=True)
    c = retrieval_metrics(qf.astype(np.float64), ql.tolist(), gf, gl.tolist(), per_class=True)
    assert a == b == c


def test_per_class_weighted_by_query_count_gives_map_all():
    qf, ql, gf, gl = _gaussian_data(4)
    names = {c: f"class_{c}" for c in range(6)}
    m = retrieval_metrics(qf, ql, gf, gl, per_class=True, class_names=names)
    assert set(m["per_class"]) == {names[c] for c in np.unique(ql)}
    weighted = sum(m["per_class"][names[c]] * np.sum(ql == c) for c in np.unique(ql)) / len(ql)
    assert weighted == pytest.approx(m["mAP@all"], abs=1e-12)
    assert m["per_class"]["class_5"] == 0.0            # class 5 has no gallery item
    assert m["num_queries_without_relevant"] == float(np.sum(ql == 5))


def test_string_labels_match_integer_labels():
    qf, ql, gf, gl = _gaussian_data(5)
    words = np.array(["cat", "dog", "owl", "bee", "elk", "yak"])
    a = retrieval_metrics(qf, ql, gf, gl)
    b = retrieval_metrics(qf, words[ql], gf, words[gl])
    # Classes are visited in sorted-label order, so only the float summation order differs.
    assert b == pytest.approx(a, abs=1e-12)


def test_conventions_describe_every_key():
    q, ql, g, gl = _hand_case()
    m = retrieval_metrics(q, ql, g, gl, per_class=True, ks_map=(3, 7), ks_precision=(2,))
    conv = metric_conventions(ks_map=(3, 7), ks_precision=(2,))
    assert set(m) <= set(conv["keys"])
    assert "gallery order" in conv["tie_policy"]
    assert set(retrieval_metrics(q, ql, g, gl)) - {"per_class"} <= set(metric_conventions()["keys"])
    assert {"mAP@all", "mAP@200", "P@100", "P@200", "mAP@200_sake"} <= set(retrieval_metrics(q, ql, g, gl))


def test_bad_inputs_raise_clear_errors():
    q, ql, g, gl = _hand_case()
    bad = q.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(MetricsInputError, match="NaN or Inf"):
        retrieval_metrics(bad, ql, g, gl)
    with pytest.raises(MetricsInputError, match="one label per feature"):
        retrieval_metrics(q, ql[:3], g, gl)
    with pytest.raises(MetricsInputError, match="differ in width"):
        retrieval_metrics(q, ql, g[:, :5], gl)
    with pytest.raises(MetricsInputError, match="integer"):
        retrieval_metrics(q, ql.float(), g, gl)
    with pytest.raises(MetricsInputError, match="positive integers"):
        retrieval_metrics(q, ql, g, gl, ks_map=(0,))
    with pytest.raises(MetricsInputError, match="class_names"):
        retrieval_metrics(q, ql, g, gl, per_class=True, class_names={0: "a"})


def test_bench_script_agrees_with_reference_procedure(capsys):
    # tools/bench_metrics re-implements the released per-query procedure; on a small problem both
    # procedures must give the same APs (float32 rounding in the reference aside).
    from tools.bench_metrics import main as bench_main

    out = bench_main(["--queries", "60", "--gallery", "300", "--classes", "5", "--dim", "32",
                      "--noise", "0.5", "--ref_queries", "20"])
    assert out["max_abs_diff"] < 1e-5
    assert 0.05 < out["metrics"]["mAP@all"] < 1.0
    assert "speed-up of ours" in capsys.readouterr().out
