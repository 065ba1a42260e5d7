"""tools.search (exact and FAISS indexes, the index cache, auto) and tools.bench_search, on small vectors."""
import logging

import numpy as np
import pytest
import torch

from tools import ToolError, bench_search, search


def _vectors(num, dim=16, seed=0):
    return search.l2_normalize(np.random.default_rng(seed).standard_normal((num, dim)).astype(np.float32))


def test_exact_index_equals_a_stable_full_sort_across_chunks_and_ties(monkeypatch):
    monkeypatch.setattr(search, "EXACT_CHUNK", 7)  # many chunks, ties straddling chunk borders
    # Multiples of 1/4: every product and sum is exact in float32, so equal vectors score bit-for-bit equal
    # whatever order a matrix product adds in, and the reference can be computed in float64.
    rng = np.random.default_rng(2)
    base = rng.integers(-2, 3, (5, 16)).astype(np.float32) / 4
    gallery = base[rng.integers(0, 5, 40)]  # [40, 16]: each vector about 8 times, exact ties
    queries = rng.integers(-2, 3, (3, 16)).astype(np.float32) / 4
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T  # [3, 40]
    order = np.argsort(-sims, axis=1, kind="stable")
    for k in (1, 5, 13, 40):
        scores, ids = search.ExactIndex(gallery).search(queries, k)
        np.testing.assert_array_equal(ids, order[:, :k])  # equal scores keep the gallery order
        np.testing.assert_array_equal(scores, np.take_along_axis(sims, order[:, :k], 1))


def test_faiss_index_is_exact_when_every_cell_is_visited():
    gallery, queries = _vectors(500, seed=4), _vectors(4, seed=5)
    index = search.FaissIndex.build(gallery, nlist=8)
    index.nprobe = index.nlist
    scores, ids = index.search(queries, 10)
    want_s, want_i = search.ExactIndex(gallery).search(queries, 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_faiss_defaults_reach_the_recall_target_on_clustered_vectors():
    # 100 vectors a class, as tools.bench_search's 10k gallery, in 64 dimensions to be quick.
    data = bench_search.ClusteredVectors(dim=64, clusters=40, intrinsic_dim=16, spread=1.0, noise=0.5, seed=0)
    gallery, queries = data.draw(4000, seed=1), data.draw(100, seed=2)
    index = search.FaissIndex.build(gallery)  # ivf_cells, default_nprobe
    assert index.nlist == search.ivf_cells(4000) == 102 and index.nprobe == search.default_nprobe(102) == 3
    truth = search.ExactIndex(gallery).search(queries, 10)[1]
    assert bench_search.recall_at(index.search(queries, 10)[1], truth) >= 0.95


def test_faiss_visits_more_cells_when_those_visited_hold_too_few():
    gallery = _vectors(200, seed=6)
    index = search.FaissIndex.build(gallery, nlist=5, nprobe=1)
    scores, ids = index.search(_vectors(2, seed=7), 150)  # no single cell holds 150 vectors
    assert (ids >= 0).all() and len({*ids[0].tolist()}) == 150


def test_faiss_index_cache_reused_and_rebuilt(tmp_path, monkeypatch, caplog):
    builds = []
    real_build = search.FaissIndex.build.__func__
    monkeypatch.setattr(search.FaissIndex, "build",
                        classmethod(lambda cls, *a, **kw: builds.append(1) or real_build(cls, *a, **kw)))
    feats = _vectors(300, seed=8)
    cache = search.faiss_cache_file(tmp_path / "gallery-0123.npz")
    assert cache == tmp_path / "gallery-0123-faiss.npz"
    first = search.open_faiss_index(feats, key="a", cache=cache, nprobe=None, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        again = search.open_faiss_index(feats, key="a", cache=cache, nprobe=None, device=torch.device("cpu"))
    assert len(builds) == 1 and "using the cached FAISS index" in caplog.text
    q = _vectors(3, seed=9)
    np.testing.assert_array_equal(first.search(q, 5)[1], again.search(q, 5)[1])
    search.open_faiss_index(feats, key="b", cache=cache, nprobe=None, device=torch.device("cpu"))  # gallery changed
    assert len(builds) == 2 and list(tmp_path.iterdir()) == [cache]  # the one slot replaced
    cache.write_bytes(b"garbage")  # an unreadable cache is only a cache
    search.open_faiss_index(feats, key="b", cache=cache, nprobe=None, device=torch.device("cpu"))
    assert len(builds) == 3


def test_auto_picks_faiss_above_the_measured_size(monkeypatch, caplog):
    assert search.choose_index("auto", search.FAISS_MIN_GALLERY) == "exact"
    assert search.choose_index("auto", search.FAISS_MIN_GALLERY + 1) == "faiss"
    assert search.choose_index("exact", 10**9) == "exact" and search.choose_index("faiss", 10) == "faiss"
    monkeypatch.setattr(search, "import_faiss", lambda required: None)  # faiss not installed
    with caplog.at_level(logging.WARNING):
        assert search.choose_index("auto", search.FAISS_MIN_GALLERY + 1) == "exact"
    assert "pip install faiss-cpu" in caplog.text


def test_faiss_required_but_missing_is_a_tool_error(monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name)) if name == "faiss"
                        else real_import(name, *a, **kw))
    with pytest.raises(ToolError, match="pip install faiss-cpu"):
        search.import_faiss(required=True)


def test_bench_search_quick_run_prints_a_table(capsys):
    rows = bench_search.main(["--sizes", "1000,3000", "--dim", "32", "--clusters", "10", "--intrinsic_dim", "8",
                              "--queries", "40", "--timed", "5"])
    out = capsys.readouterr().out
    assert out.count("| exact |") == 2 and "| 3,000 | faiss IVF-Flat (default) |" in out
    assert len([r for r in rows if "default" in r["method"]]) == 2
    for size in (1000, 3000):  # more cells visited, more of the exact top 10 found
        recalls = [r["recall"] for r in sorted((r for r in rows if r["size"] == size and r["nprobe"]),
                                               key=lambda r: r["nprobe"])]
        assert recalls == sorted(recalls) and recalls[-1] > 0.8
    assert all(r["median_ms"] > 0 and r["p99_ms"] >= r["median_ms"] for r in rows)
