"""Exact, vectorised retrieval metrics for zero-shot SBIR: mAP@all, mAP@K, P@K.

Every sketch is a query, every photo is the gallery, a photo is relevant when its class equals the
query's class, and similarity is cosine (both sides L2-normalised, then a float32 matmul).

Ranking and ties
    Each query ranks the whole gallery by descending similarity. Ties are broken by gallery order
    (the result of a *stable* sort of -similarity): of two gallery items with exactly equal scores,
    the one that comes first in the gallery is ranked first. Every number below follows from that
    single ranking. Exact float32 ties are not rare: on Sketchy-25-sized random features about one
    query in six has a relevant item tied with another item. ``chunk_size`` only changes how many
    queries share one matmul, which BLAS may round differently in the last bit.

How it is computed (and why it is fast)
    All metrics are functions of the ranks ``r_1 < ... < r_R`` of a query's ``R`` relevant gallery
    items: precision at the j-th relevant item is ``j / r_j``. We never build or sort an index
    matrix. Queries are grouped by class (queries of one class share one set of relevant gallery
    columns); per chunk of queries we sort the *values* of each similarity row (numpy's SIMD sort
    on the CPU, in as many threads as torch uses; ``torch.sort`` on a GPU) and, with
    ``searchsorted``, read off each relevant item's rank as ``1 + #{scores > its score}``, plus,
    for an exact tie, the number of equal scores earlier in the gallery. Everything after the
    ranks is ``[n, R]`` work in float64.

Conventions (see :func:`metric_conventions`, which ``test.py`` writes beside the numbers)
    * ``mAP@all``: non-interpolated AP over the full ranking, ``(1/R) sum_j j/r_j``; a query with no
      relevant gallery item has AP 0 and is kept in the mean (torchmetrics' behaviour).
    * ``mAP@K`` (default K=200): torchmetrics' ``retrieval_average_precision(preds, target,
      top_k=K)``: precision averaged over the relevant items *inside* the top K; 0 when none is.
      This is the PuXIM code's convention.
    * ``P@K`` (default 100, 200): relevant items in the top K divided by K (torchmetrics'
      ``retrieval_precision`` with its default ``adaptive_k=False``, so a gallery smaller than K
      still divides by K).
    * ``mAP@K_sake`` and ``mAP@all_sake``: the SAKE / ZSE-SBIR convention, VOC-style interpolated
      precision (precision at a rank replaced by the best precision at any later rank inside the
      cut-off), summed over the relevant items inside the top K and divided by
      ``min(K, gallery size, R)``; queries with no relevant item are left out of the mean (their AP
      is NaN there and the mean is ``np.nanmean``). Mirrors ``eval_AP_inner`` + ``VOCap`` of
      qliu24/SAKE (src/test_cse_resnet_tuberlin_zeroshot.py) and ``voc_eval`` + ``voc_ap`` of
      buptLinfy/ZSE-SBIR (utils/ap.py), which are the same computation.
    * ``P@K_zse``: ZSE-SBIR's ``precision_eval`` (utils/ap.py): relevant items in the top
      ``min(K, R)`` divided by ``min(K, R)``; queries with no relevant item are left out. (SAKE's
      ``eval_precision`` divides by ``min(K, gallery size)``: equal to ``P@K`` whenever the gallery
      has at least K items, as on every benchmark.)
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MetricsInputError",
    "retrieval_metrics",
    "chance_level",
    "metric_conventions",
    "relevant_ranks",
    "metrics_from_ranks",
    "chance_ratios",
    "chance_verdict",
]

TIE_POLICY = "stable: gallery order (ties in similarity keep the gallery's order)"


class MetricsInputError(ValueError):
    """Features or labels given to :func:`retrieval_metrics` are malformed."""


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------
def _as_features(x: Any, name: str, device: torch.device) -> torch.Tensor:
    """float32 ``[N, D]`` tensor on ``device``, L2-normalised along D."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise MetricsInputError(f"utils/metrics.py: {name} must be a torch tensor or numpy array, "
                                f"got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise MetricsInputError(f"utils/metrics.py: {name} must have shape [N, D] with N, D > 0, "
                                f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise MetricsInputError(f"utils/metrics.py: {name} must be floating point, got {x.dtype}")
    x = x.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise MetricsInputError(f"utils/metrics.py: {name} contains NaN or Inf; check the model's "
                                "outputs (e.g. an AMP overflow) before evaluating")
    return F.normalize(x, dim=1)


def _as_label_array(y: Any, name: str, length: int) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != length:
        raise MetricsInputError(f"utils/metrics.py: {name} must be 1-D with one label per feature "
                                f"row ({length}), got shape {y.shape}")
    if y.dtype.kind == "f":
        raise MetricsInputError(f"utils/metrics.py: {name} must hold integer (or string) class "
                                f"labels, got dtype {y.dtype}")
    return y


def _check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise MetricsInputError(f"utils/metrics.py: {name} must hold positive integers, got {ks}")
    return tuple(int(k) for k in ks)


# ----------------------------------------------------------------------------------------------
# Ranks of the relevant items
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _thread_pool(num_threads: int) -> ThreadPoolExecutor:
    # numpy's sort and searchsorted release the GIL, so plain threads work on row blocks in parallel.
    return ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="metrics")


# Rows with more exact ties than this (e.g. collapsed features) use a stable full sort instead of
# resolving each tied relevant item against the whole row.
_MAX_TIES_PER_ROW = 32
_TIE_PAIRS_PER_BLOCK = 2048


def _ranks_rows_numpy(sims: np.ndarray, relevant_idx: np.ndarray, is_rel: np.ndarray,
                      ranks: np.ndarray) -> None:
    """CPU worker for :func:`relevant_ranks`: fills ``ranks[i]`` for each row ``sims[i]``."""
    G = sims.shape[1]
    for i in range(sims.shape[0]):
        row = sims[i]                                               # [G]
        rel = row[relevant_idx]                                     # [R] in gallery order
        order = np.argsort(-rel, kind="stable")                     # ranking order of relevant
        s, gi = rel[order], relevant_idx[order]                     # [R] descending scores
        row_sorted = np.sort(row)                                   # SIMD float32 sort, values only
        c = np.searchsorted(row_sorted, s, side="right")            # #{score <= s}
        r = (G + 1) - c                                             # 1 + #{score > s}
        # row_sorted[c - 1] is s itself; an equal row_sorted[c - 2] is an exact tie, which the
        # gallery order breaks: add the equal scores that come earlier in the gallery.
        tied = np.flatnonzero((c >= 2) & (row_sorted[np.maximum(c - 2, 0)] == s))
        if len(tied) > _MAX_TIES_PER_ROW:
            r = np.flatnonzero(is_rel[np.argsort(-row, kind="stable")]) + 1
        else:
            for j in tied:
                r[j] += np.count_nonzero(row[:gi[j]] == s[j])
        ranks[i] = r


def _relevant_ranks_numpy(sims: torch.Tensor, relevant_idx: torch.Tensor) -> torch.Tensor:
    # numpy's float32 sort is ~2x faster than torch.sort on the CPU (which also builds an index
    # tensor we do not need), a per-row searchsorted on the cache-hot sorted row beats torch's
    # batched one, and both release the GIL: row blocks run in parallel threads.
    a = sims.detach().contiguous().numpy()
    rel = relevant_idx.cpu().numpy()
    is_rel = np.zeros(a.shape[1], dtype=bool)
    is_rel[rel] = True
    ranks = np.empty((a.shape[0], len(rel)), dtype=np.int64)
    threads = max(1, min(torch.get_num_threads(), a.shape[0]))
    jobs = [(a[b[0]:b[-1] + 1], rel, is_rel, ranks[b[0]:b[-1] + 1])
            for b in np.array_split(np.arange(a.shape[0]), threads) if len(b)]
    if len(jobs) == 1:
        _ranks_rows_numpy(*jobs[0])
    else:
        list(_thread_pool(len(jobs)).map(lambda job: _ranks_rows_numpy(*job), jobs))
    return torch.from_numpy(ranks)


def _ranks_by_stable_sort(sims: torch.Tensor, relevant_idx: torch.Tensor) -> torch.Tensor:
    """Ranks of the relevant items from a stable full sort of each row (``[m, G]`` -> ``[m, R]``)."""
    m, G = sims.shape                                                       # [m, G]
    is_rel = torch.zeros(G, dtype=torch.bool, device=sims.device)
    is_rel[relevant_idx] = True
    order = torch.sort(-sims, dim=1, stable=True).indices                  # [m, G] best first
    rel_in_order = is_rel[order]                                            # [m, G]
    # Every row holds exactly R relevant items; nonzero() lists them row by row, in rank order.
    cols = rel_in_order.nonzero()[:, 1]                                     # [m * R]
    return cols.view(m, relevant_idx.numel()) + 1                          # [m, R] 1-based


def _relevant_ranks_torch(sims: torch.Tensor, relevant_idx: torch.Tensor) -> torch.Tensor:
    """The same computation as :func:`_ranks_rows_numpy`, batched in torch (for GPUs)."""
    n, G = sims.shape                                                       # [n, G]
    rel_sorted = torch.sort(-sims.index_select(1, relevant_idx), dim=1, stable=True)
    s = -rel_sorted.values                                                  # [n, R] descending
    gi = relevant_idx[rel_sorted.indices]                                   # [n, R] gallery index
    row_sorted = torch.sort(sims, dim=1).values                             # [n, G]
    c = torch.searchsorted(row_sorted, s, right=True)                       # [n, R] #{score <= s}
    ranks = (G + 1) - c                                                     # 1 + #{score > s}
    tie = (c >= 2) & (row_sorted.gather(1, (c - 2).clamp(min=0)) == s)      # [n, R]
    if bool(tie.any()):
        heavy = tie.sum(1) > _MAX_TIES_PER_ROW                              # [n]
        pairs = (tie & ~heavy[:, None]).nonzero()                           # [P, 2] (row, j)
        cols = torch.arange(G, device=sims.device)
        for block in pairs.split(_TIE_PAIRS_PER_BLOCK):
            row, j = block[:, 0], block[:, 1]
            earlier_equal = (sims[row] == s[row, j, None]) & (cols < gi[row, j, None])  # [p, G]
            ranks[row, j] += earlier_equal.sum(1)
        if bool(heavy.any()):
            ranks[heavy] = _ranks_by_stable_sort(sims[heavy], relevant_idx)
    return ranks


def relevant_ranks(sims: torch.Tensor, relevant_idx: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """1-based ranks of the relevant gallery items, ascending, for queries that share them.

    rank = 1 + #{scores > s} + #{scores == s earlier in the gallery}: the position of the item in
    a stable sort of ``-sims[i]``. The first term comes from a values-only sort and a
    ``searchsorted``; the second is non-zero only for exact float ties, which are resolved
    one by one (rows with very many ties use a stable full sort).

    Args:
        sims: ``[n, G]`` float similarities of n queries to the G gallery items.
        relevant_idx: ``[R]`` long gallery indices, ascending, of the items relevant to *all* n
            queries (the queries of one class), ``R >= 1``.
        backend: ``"numpy"`` (CPU tensors only), ``"torch"``, or ``"auto"`` (numpy on the CPU).

    Returns:
        ``[n, R]`` int64 on the device of ``sims``: row i holds ``r_1 < ... < r_R``.
    """
    if backend == "auto":
        backend = "numpy" if sims.device.type == "cpu" else "torch"
    if backend == "numpy":
        return _relevant_ranks_numpy(sims, relevant_idx)
    if backend == "torch":
        return _relevant_ranks_torch(sims, relevant_idx.to(sims.device))
    raise ValueError(f"utils/metrics.py: backend must be 'auto', 'numpy' or 'torch', got {backend!r}")


# ----------------------------------------------------------------------------------------------
# Metrics from ranks
# ----------------------------------------------------------------------------------------------
def _reverse_cummax(x: torch.Tensor) -> torch.Tensor:
    """``y[:, j] = max(x[:, j:])`` — VOC-style interpolated precision."""
    return x.flip(1).cummax(dim=1).values.flip(1)


def metrics_from_ranks(
    ranks: torch.Tensor,
    num_gallery: int,
    *,
    ks_map: Sequence[int] = (200,),
    ks_precision: Sequence[int] = (100, 200),
) -> dict[str, torch.Tensor]:
    """Per-query metrics from the ascending ranks ``[n, R]`` of the relevant items.

    Returns float64 ``[n]`` tensors keyed as in :func:`retrieval_metrics`; the SAKE/ZSE-SBIR keys
    hold NaN for queries without relevant items (R == 0), which their convention leaves out.
    """
    n, R = ranks.shape
    dev = ranks.device
    f64 = dict(dtype=torch.float64, device=dev)
    out: dict[str, torch.Tensor] = {}
    if R == 0:
        zeros, nans = torch.zeros(n, **f64), torch.full((n,), float("nan"), **f64)
        out["mAP@all"], out["mAP@all_sake"] = zeros, nans
        for k in ks_map:
            out[f"mAP@{k}"], out[f"mAP@{k}_sake"] = zeros, nans
        for k in ks_precision:
            out[f"P@{k}"], out[f"P@{k}_zse"] = zeros, nans
        return out

    r = ranks.to(torch.float64)                                             # [n, R]
    prec = torch.arange(1, R + 1, **f64) / r                                # [n, R] precision at r_j
    out["mAP@all"] = prec.sum(1) / R
    out["mAP@all_sake"] = _reverse_cummax(prec).sum(1) / R
    for k in ks_map:
        top = min(k, num_gallery)
        w = min(top, R)                  # r_j >= j, so only the first w relevant items can be inside
        inside = r[:, :w] <= top                                            # [n, w] a prefix per row
        hits = inside.sum(1)                                                # [n]
        prec_in = prec[:, :w] * inside                                      # 0 outside the top k
        # torchmetrics: mean precision over the relevant items found in the top k (0 if none).
        out[f"mAP@{k}"] = torch.where(hits > 0, prec_in.sum(1) / hits.clamp(min=1), 0.0)
        # SAKE/ZSE-SBIR: interpolated precision (max over later ranks inside the top k), divided
        # by min(top, R) — VOCap with rec = tp / min(top, tot_pos).
        out[f"mAP@{k}_sake"] = (_reverse_cummax(prec_in) * inside).sum(1) / w
    for k in ks_precision:
        out[f"P@{k}"] = (r[:, :min(k, R)] <= k).sum(1).to(torch.float64) / k
        m = min(k, R)
        out[f"P@{k}_zse"] = (r[:, :m] <= m).sum(1).to(torch.float64) / m
    return out


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _metric_keys(ks_map: Sequence[int], ks_precision: Sequence[int]) -> list[str]:
    keys = ["mAP@all"]
    keys += [f"mAP@{k}" for k in ks_map]
    keys += [f"P@{k}" for k in ks_precision]
    keys += ["mAP@all_sake"] + [f"mAP@{k}_sake" for k in ks_map]
    keys += [f"P@{k}_zse" for k in ks_precision]
    return keys


def _label_key(label: Any, class_names: Mapping | Sequence | None) -> Any:
    label = label.item() if isinstance(label, np.generic) else label
    if class_names is None:
        return label
    try:
        return class_names[label]
    except (KeyError, IndexError, TypeError) as e:
        raise MetricsInputError(f"utils/metrics.py: class_names has no entry for label {label!r}; "
                                "pass a mapping (or sequence) that covers every query label") from e


def _check_options(chunk_size: int, rank_backend: str) -> None:
    if rank_backend not in ("auto", "numpy", "torch"):
        raise MetricsInputError(f"utils/metrics.py: rank_backend must be 'auto', 'numpy' or 'torch', "
                                f"got {rank_backend!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise MetricsInputError(f"utils/metrics.py: chunk_size must be a positive int, got {chunk_size!r}")


def _encoded_inputs(query_feats, query_labels, gallery_feats, gallery_labels, device: torch.device) -> tuple:
    """``(q [Nq, D], g [Ng, D], q_codes [Nq], g_codes [Ng], uniques)``: the features as :func:`_as_features`
    makes them, on ``device``, and integer class codes shared by both sides (``uniques[code]`` is the label)."""
    q = _as_features(query_feats, "query_feats", device)                    # [Nq, D]
    g = _as_features(gallery_feats, "gallery_feats", device)                # [Ng, D]
    if q.shape[1] != g.shape[1]:
        raise MetricsInputError(f"utils/metrics.py: query and gallery features differ in width "
                                f"({q.shape[1]} vs {g.shape[1]})")
    q_lab = _as_label_array(query_labels, "query_labels", q.shape[0])
    g_lab = _as_label_array(gallery_labels, "gallery_labels", g.shape[0])
    # Shared integer codes for both sides (works for ints and strings alike).
    try:
        uniques, codes = np.unique(np.concatenate([q_lab, g_lab]), return_inverse=True)
    except TypeError as e:
        raise MetricsInputError("utils/metrics.py: query and gallery labels must be of one "
                                "comparable type (all ints or all strings)") from e
    return q, g, codes[: len(q_lab)], codes[len(q_lab):], uniques


def _queries_by_class(q_codes: np.ndarray):
    """``(code, rows)`` of each class among the queries, in code order: ``rows`` its queries, ascending."""
    order = np.argsort(q_codes, kind="stable")
    classes, starts = np.unique(q_codes[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for c, s, e in zip(classes, starts, ends):
        yield c, order[s:e]


def _class_blocks(q: torch.Tensor, g: torch.Tensor, rows_all: torch.Tensor, rel_idx: torch.Tensor, *,
                  chunk_size: int, rank_backend: str, ks_map: Sequence[int], ks_precision: Sequence[int]):
    """Per-query metrics (:func:`metrics_from_ranks`) of one class's queries ``q[rows_all]``, whose relevant
    gallery items are ``rel_idx`` (``[R]``, maybe empty), in blocks of at most ``chunk_size`` queries."""
    for lo in range(0, len(rows_all), chunk_size):
        rows = rows_all[lo:lo + chunk_size]
        if len(rel_idx) == 0:
            ranks = torch.zeros((len(rows), 0), dtype=torch.long, device=rows_all.device)
        else:
            sims = q.index_select(0, rows) @ g.T                            # [n, Ng] cosine
            ranks = relevant_ranks(sims, rel_idx, backend=rank_backend)      # [n, R]
        yield metrics_from_ranks(ranks, g.shape[0], ks_map=ks_map, ks_precision=ks_precision)


@dataclass
class _MetricTotals:
    """The per-query metrics of all queries, summed (what :func:`retrieval_metrics` averages)."""

    sums: dict[str, torch.Tensor]  # per key, float64 sum of the non-NaN per-query values
    # Queries counted in each mean: the SAKE/ZSE-SBIR keys are NaN for queries without a relevant
    # item, which their convention leaves out of the mean.
    valid: dict[str, int]
    class_ap: dict[int, float]  # class code -> mAP@all averaged over that class's queries
    num_without_relevant: int  # queries whose class has no gallery item

    def means(self) -> dict[str, float]:
        """Mean of each key over its counted queries (NaN where none was counted), in key order."""
        return {k: (float(v) / self.valid[k] if self.valid[k] else float("nan")) for k, v in self.sums.items()}


def _sum_metrics_by_class(q: torch.Tensor, g: torch.Tensor, q_codes: np.ndarray, g_codes: np.ndarray,
                          device: torch.device, *, chunk_size: int, rank_backend: str,
                          ks_map: Sequence[int], ks_precision: Sequence[int]) -> _MetricTotals:
    """Sums of the per-query metrics over all queries, one class (and block of its queries) at a time."""
    keys = _metric_keys(ks_map, ks_precision)
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
    valid = {k: 0 for k in keys}
    class_ap: dict[int, float] = {}
    num_without_relevant = 0

    for c, rows in _queries_by_class(q_codes):
        rel_np = np.flatnonzero(g_codes == c)
        rel_idx = torch.from_numpy(rel_np).to(device)                       # [R]
        rows_all = torch.from_numpy(rows).to(device)                        # queries of class c
        class_sum = torch.zeros((), dtype=torch.float64, device=device)
        if len(rel_np) == 0:
            num_without_relevant += len(rows_all)
        for per_query in _class_blocks(q, g, rows_all, rel_idx, chunk_size=chunk_size, rank_backend=rank_backend,
                                       ks_map=ks_map, ks_precision=ks_precision):
            for k, v in per_query.items():
                ok = ~torch.isnan(v)
                sums[k] += v[ok].sum()
                valid[k] += int(ok.sum())
            class_sum += per_query["mAP@all"].sum()
        class_ap[int(c)] = float(class_sum) / len(rows)
    return _MetricTotals(sums, valid, class_ap, num_without_relevant)


def _compute_device(query_feats: Any, device: torch.device | str | None) -> torch.device:
    """``device``, or by default the device of ``query_feats`` (the CPU for numpy arrays)."""
    if device is None:
        device = query_feats.device if isinstance(query_feats, torch.Tensor) else torch.device("cpu")
    return torch.device(device)


@torch.no_grad()
def retrieval_metrics(
    query_feats: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray | Sequence,
    gallery_feats: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray | Sequence,
    *,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    ks_map: Sequence[int] = (200,),
    ks_precision: Sequence[int] = (100, 200),
    per_class: bool = False,
    class_names: Mapping | Sequence | None = None,
    rank_backend: str = "auto",
) -> dict[str, Any]:
    """Category-level retrieval metrics of every query against the whole gallery.

    Args:
        query_feats: ``[Nq, D]`` query embeddings (torch or numpy); L2-normalised here.
        query_labels: ``[Nq]`` class labels (ints, or strings).
        gallery_feats: ``[Ng, D]`` gallery embeddings.
        gallery_labels: ``[Ng]`` class labels.
        chunk_size: at most this many queries (all of one class) share a block; the block's
            similarities take ``chunk_size * Ng * 4`` bytes, a few times that on a GPU where
            ``torch.sort`` needs buffers. Python loops run over classes and blocks, never queries.
        device: where to compute; default the device of ``query_feats`` (CPU for numpy).
        ks_map: cut-offs K for ``mAP@K`` (torchmetrics) and ``mAP@K_sake``.
        ks_precision: cut-offs K for ``P@K`` and ``P@K_zse``.
        per_class: also return ``"per_class": {class: mAP@all over that class's queries}``.
        class_names: optional mapping (or sequence) label -> name for the ``per_class`` keys.
        rank_backend: ``"auto"`` (numpy on the CPU, torch elsewhere), ``"numpy"`` or ``"torch"``;
            see :func:`relevant_ranks`. Both give identical ranks.

    Returns:
        dict of Python floats: ``mAP@all``, ``mAP@K``, ``P@K``, ``mAP@all_sake``, ``mAP@K_sake``,
        ``P@K_zse``, plus the counts ``num_queries``, ``num_gallery`` and
        ``num_queries_without_relevant`` (as floats), and ``per_class`` when asked. The
        conventions of every key are spelled out in :func:`metric_conventions` and the module
        docstring; ranking ties keep gallery order (stable sort of -similarity).
    """
    _check_options(chunk_size, rank_backend)
    ks_map, ks_precision = _check_ks(ks_map, "ks_map"), _check_ks(ks_precision, "ks_precision")
    device = _compute_device(query_feats, device)
    q, g, q_codes, g_codes, uniques = _encoded_inputs(query_feats, query_labels, gallery_feats, gallery_labels,
                                                      device)
    totals = _sum_metrics_by_class(q, g, q_codes, g_codes, device,
                                   chunk_size=chunk_size, rank_backend=rank_backend, ks_map=ks_map,
                                   ks_precision=ks_precision)
    result: dict[str, Any] = totals.means()
    result["num_queries"] = float(q.shape[0])
    result["num_gallery"] = float(g.shape[0])
    result["num_queries_without_relevant"] = float(totals.num_without_relevant)
    if per_class:
        result["per_class"] = {_label_key(uniques[c], class_names): ap for c, ap in totals.class_ap.items()}
    return result


def metric_conventions(ks_map: Sequence[int] = (200,), ks_precision: Sequence[int] = (100, 200)) -> dict:
    """What every key of :func:`retrieval_metrics` means (JSON-serialisable; for metrics.json)."""
    keys: dict[str, str] = {
        "mAP@all": "non-interpolated AP over the full ranking, sum_j (j / rank_j) / R over the R "
                   "relevant gallery items, averaged over all queries; a query with no relevant "
                   "item counts as AP 0",
    }
    for k in ks_map:
        keys[f"mAP@{k}"] = (f"AP over the top {k}, torchmetrics retrieval_average_precision(top_k={k}) "
                            f"(PuXIM code): precision averaged over the relevant items inside the top "
                            f"{k}; 0 when none is inside")
    for k in ks_precision:
        keys[f"P@{k}"] = (f"relevant items in the top {k} divided by {k} (torchmetrics "
                          "retrieval_precision, adaptive_k=False)")
    keys["mAP@all_sake"] = ("SAKE/ZSE-SBIR VOC-interpolated AP over the full ranking (eval_AP_inner/VOCap, "
                            "voc_eval/voc_ap); queries with no relevant item excluded from the mean")
    for k in ks_map:
        keys[f"mAP@{k}_sake"] = (f"SAKE/ZSE-SBIR AP@{k}: VOC-interpolated precision summed over the "
                                 f"relevant items in the top {k}, divided by min({k}, gallery size, R); "
                                 "queries with no relevant item excluded from the mean")
    for k in ks_precision:
        keys[f"P@{k}_zse"] = (f"ZSE-SBIR precision_eval: relevant items in the top min({k}, R) divided "
                              f"by min({k}, R); queries with no relevant item excluded from the mean")
    keys["num_queries"] = "number of queries (float)"
    keys["num_gallery"] = "number of gallery items (float)"
    keys["num_queries_without_relevant"] = "queries whose class has no gallery item (float)"
    keys["per_class"] = "mAP@all averaged over the queries of each class (only with per_class=True)"
    return {
        "similarity": "cosine: L2-normalised float32 features, matmul",
        "ranking": "full gallery per query, descending similarity",
        "tie_policy": TIE_POLICY,
        "relevance": "gallery item has the query's class label",
        "keys": keys,
    }


def chance_level(query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> float:
    """The mAP (and P@K) of a random ranking: the fraction of the gallery relevant to a query, averaged
    over the queries (integer labels ``[Nq]``, ``[Ng]``)."""
    q, g = torch.as_tensor(query_labels).long(), torch.as_tensor(gallery_labels).long()
    counts = torch.bincount(g, minlength=int(max(q.max(), g.max())) + 1)  # [C]
    return float(counts[q].double().mean() / max(g.numel(), 1))


def chance_ratios(metrics: Mapping) -> tuple[dict, str] | None:
    """``({"mAP@all": r, "P@100": r}, verdict)``: each metric over ``chance_mAP`` (the fraction of the gallery
    that is relevant: what a random ranking scores on both), and a verdict naming which of them reach the
    2x-chance bar that ``make run`` is held to (:func:`chance_verdict`); None without a chance level (no gallery
    photo shares a query's class)."""
    chance = float(metrics.get("chance_mAP") or 0.0)
    if chance <= 0.0:
        return None
    ratios = {k: metrics[k] / chance for k in ("mAP@all", "P@100")}
    return ratios, chance_verdict(ratios)


def chance_verdict(ratios: Mapping[str, float], bar: float = 2.0) -> str:
    """Which figures reach ``bar`` x chance, by name, so that the verdict never reads as contradicting the
    ratios printed beside it: "mAP@all and P@100 both at least 2x chance", "P@100 below 2x chance
    (mAP@all reaches it)", "mAP@all and P@100 both below 2x chance"."""
    # decided on the figure as printed (2 decimals); a NaN ratio (a NaN loss, an empty gallery) reaches no bar,
    # so it is tested as "not >= bar": "nan < bar" is False and would count it as reaching it
    below = [k for k, r in ratios.items() if not round(r, 2) >= bar]
    above = [k for k in ratios if k not in below]
    if not below:
        return f"{' and '.join(above)} both at least {bar:g}x chance"
    if not above:
        return f"{' and '.join(below)} both below {bar:g}x chance"
    return f"{' and '.join(below)} below {bar:g}x chance ({' and '.join(above)} reaches it)"


def final_summary(metrics: Mapping, best: Mapping) -> str:
    """The line a training run ends with: the last evaluation against chance, and the best one."""
    best_part = f"Best mAP@all {best['mAP@all']:.4f} at epoch {best['epoch']}."
    comparison = chance_ratios(metrics)
    if comparison is None:
        return (f"final unseen-class mAP@all {metrics['mAP@all']:.4f}, P@100 {metrics['P@100']:.4f}; no chance level "
                f"(no gallery photo shares a query's class). {best_part}")
    ratios, verdict = comparison
    return (f"final unseen-class mAP@all {metrics['mAP@all']:.4f} ({ratios['mAP@all']:.2f}x chance), P@100 "
            f"{metrics['P@100']:.4f} ({ratios['P@100']:.2f}x chance); chance level {metrics['chance_mAP']:.4f}: "
            f"{verdict}. {best_part}")
