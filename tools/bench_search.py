"""Exact search against a FAISS IVF-Flat index: build time, memory, query latency and recall@10.

    python -m tools.bench_search                          # 10k, 100k and 1M gallery vectors (minutes)
    python -m tools.bench_search --sizes 10000,100000     # a quick run

Both indexes are the ones ``tools.search`` (and so ``tools.retrieve`` and ``tools.demo``) uses, with its
defaults: ``ExactIndex`` (chunked matrix product) and ``FaissIndex.build`` (about 4·√G cells, 1/32 of
them visited per query); FAISS rows are also given at other ``nprobe`` values. The data are synthetic and
seeded, shaped like embeddings of a photo gallery: ``--clusters`` classes, each a random unit centre plus
a spread along its own ``--intrinsic_dim``-dimensional subspace plus a little isotropic noise, every
vector L2-normalised (inner product = cosine); queries are drawn the same way (sketches of gallery classes).

Latency is per query (one query at a time, as the demo and tools.retrieve search), median and 99th
percentile over ``--timed`` queries after a warm-up; recall@10 is the share of the exact top 10 that the
index returns, over ``--queries`` queries. Memory is the index's size: the ``[G, D]`` float32 matrix for
exact search, the vectors, ids and cell centroids for FAISS. Prints a Markdown table and the gallery size
at which exact search passes ``--budget_ms`` per query (what ``tools.search.FAISS_MIN_GALLERY`` is set from).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from tools import ToolError, run_tool
from tools.results_page import add_markdown_flag, write_page
from tools.search import ExactIndex, FaissIndex, default_nprobe, import_faiss

DIM = 768  # a ViT-B/16 embedding


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m tools.bench_search", description="exact search vs FAISS IVF-Flat")
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help="gallery sizes, comma-separated (default 10000,100000,1000000)")
    p.add_argument("--dim", type=int, default=DIM, help=f"vector size (default {DIM})")
    p.add_argument("--clusters", type=int, default=100, help="classes in the gallery (default 100)")
    p.add_argument("--intrinsic_dim", type=int, default=64,
                   help="dimensions a class spreads along (default 64)")
    p.add_argument("--spread", type=float, default=1.0, help="class spread against its unit centre (default 1.0)")
    p.add_argument("--noise", type=float, default=0.5, help="isotropic noise, as a norm (default 0.5)")
    p.add_argument("--queries", type=int, default=500, help="queries for recall@10 (default 500)")
    p.add_argument("--timed", type=int, default=100, help="queries timed one by one (default 100)")
    p.add_argument("--nprobe", default="auto",
                   help="FAISS cells visited per query, comma-separated, or auto: the default and a sweep around it")
    p.add_argument("--k", type=int, default=10, help="recall@k (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget_ms", type=float, default=20.0,
                   help="latency budget of one search: the size where exact search passes it is printed (default 20)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where exact search runs (default cpu)")
    add_markdown_flag(p)
    return p


def main(argv=None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    args.command_argv = argv  # None: the page gives this process's command line
    return run_tool("tools.bench_search", run, args)


# ----------------------------------------------------------------------------- data
class ClusteredVectors:
    """Seeded synthetic embeddings: a unit centre per class, a spread in a per-class subspace, isotropic noise."""

    def __init__(self, *, dim: int, clusters: int, intrinsic_dim: int, spread: float, noise: float, seed: int):
        rng = np.random.default_rng(seed)
        self.dim, self.spread, self.noise = dim, spread, noise
        self.centres = _unit(rng.standard_normal((clusters, dim)).astype(np.float32))  # [C, D]
        # An orthonormal basis per class: the directions its members vary along.
        bases = rng.standard_normal((clusters, dim, intrinsic_dim)).astype(np.float32)
        self.bases = np.linalg.qr(bases)[0].transpose(0, 2, 1).copy()  # [C, r, D], orthonormal rows

    def draw(self, num: int, seed: int) -> np.ndarray:
        """``[num, D]`` unit vectors of random classes, generated class by class (memory: the output only)."""
        rng = np.random.default_rng(seed)
        classes = rng.integers(0, len(self.centres), num)
        out = np.empty((num, self.dim), np.float32)
        r = self.bases.shape[1]
        for c in range(len(self.centres)):
            rows = np.flatnonzero(classes == c)
            for start in range(0, len(rows), 1 << 15):  # bounded temporaries
                sel = rows[start:start + (1 << 15)]
                z = rng.standard_normal((len(sel), r), dtype=np.float32)  # [n, r]
                iso = rng.standard_normal((len(sel), self.dim), dtype=np.float32)  # [n, D]
                out[sel] = (self.centres[c] + (self.spread / np.sqrt(r)) * (z @ self.bases[c])
                            + (self.noise / np.sqrt(self.dim)) * iso)
        return _unit(out)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ----------------------------------------------------------------------------- measuring
def latency_ms(index, queries: np.ndarray, k: int, warmup: int = 3) -> tuple[float, float]:
    """Median and 99th percentile of one-query searches, in milliseconds."""
    for q in queries[:warmup]:
        index.search(q[None], k)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 99))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top k ``[Q, k]`` among ``found [Q, k]``."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def bench_size(args, data: ClusteredVectors, size: int, nprobes: list[int] | None) -> list[dict]:
    """The rows of one gallery size: exact, then FAISS at each nprobe."""
    device = torch.device(args.device)
    gallery = data.draw(size, seed=args.seed + 1)  # [G, D]
    queries = data.draw(max(args.queries, args.timed), seed=args.seed + 2)  # [Q, D]
    t0 = time.perf_counter()
    exact = ExactIndex(gallery, device)
    build = time.perf_counter() - t0
    truth = exact.search(queries[:args.queries], args.k)[1]  # [Q, k]
    median, p99 = latency_ms(exact, queries[:args.timed], args.k)
    rows = [dict(size=size, method="exact", nlist=None, nprobe=None, build_s=build, memory_mb=gallery.nbytes / 2**20,
                 median_ms=median, p99_ms=p99, recall=1.0)]
    _report(rows[-1])
    del exact

    t0 = time.perf_counter()
    faiss_index = FaissIndex.build(gallery, device=device, seed=args.seed)
    build = time.perf_counter() - t0
    del gallery  # the index holds its own copy of the vectors
    memory = faiss_memory(faiss_index.cpu_index) / 2**20
    nlist = faiss_index.nlist
    default = default_nprobe(nlist)
    sweep = nprobes or sorted({max(1, default // 4), max(1, default // 2), default, min(nlist, default * 2)})
    for nprobe in sweep:
        faiss_index.nprobe = min(nprobe, nlist)
        found = faiss_index.search(queries[:args.queries], args.k)[1]
        median, p99 = latency_ms(faiss_index, queries[:args.timed], args.k)
        rows.append(dict(size=size, method="faiss IVF-Flat" + (" (default)" if nprobe == default else ""),
                         nlist=nlist, nprobe=faiss_index.nprobe, build_s=build, memory_mb=memory, median_ms=median,
                         p99_ms=p99, recall=recall_at(found, truth)))
        _report(rows[-1])
    return rows


def faiss_memory(index) -> int:
    """Bytes an IVF-Flat index holds: its vectors and their ids in the cells, and the cell centroids."""
    return index.ntotal * (index.d * 4 + 8) + index.nlist * index.d * 4


def exact_limit(rows: list[dict], budget_ms: float) -> int | None:
    """The gallery size at which exact search's median latency reaches ``budget_ms``: a least-squares line
    ``latency = a + b·G`` through the measured sizes (exact search is one pass over the gallery)."""
    exact = [(r["size"], r["median_ms"]) for r in rows if r["method"] == "exact"]
    if len(exact) < 2:
        return None
    b, a = np.polyfit([s for s, _ in exact], [m for _, m in exact], 1)
    return int(round((budget_ms - a) / b, -3)) if b > 0 else None


def _report(row: dict) -> None:
    print(f"# {row['size']:>9,} {row['method']:<26} nprobe {row['nprobe'] or '-':>4}: median {row['median_ms']:.2f} ms, "
          f"recall@10 {row['recall']:.3f}", file=sys.stderr, flush=True)


def markdown(rows: list[dict], k: int) -> str:
    lines = [f"| gallery | method | cells / visited | build (s) | memory (MB) | median (ms) | p99 (ms) | "
             f"speed-up (median) | recall@{k} |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    exact = {r["size"]: r["median_ms"] for r in rows if r["method"] == "exact"}
    for r in rows:
        cells = "–" if r["nlist"] is None else f"{r['nlist']} / {r['nprobe']}"
        lines.append(f"| {r['size']:,} | {r['method']} | {cells} | {r['build_s']:.2f} | {r['memory_mb']:.0f} | "
                     f"{r['median_ms']:.2f} | {r['p99_ms']:.2f} | {exact[r['size']] / r['median_ms']:.1f}× | "
                     f"{r['recall']:.3f} |")
    return "\n".join(lines)


def run(args) -> list[dict]:
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        nprobes = None if args.nprobe == "auto" else [int(n) for n in args.nprobe.split(",")]
    except ValueError:
        raise ToolError(f"--sizes and --nprobe take comma-separated integers, got {args.sizes!r} / {args.nprobe!r}") \
            from None
    if not sizes or min(sizes) < args.k or args.queries < 1 or args.timed < 1:
        raise ToolError(f"every --sizes value must be at least --k ({args.k}), and --queries, --timed positive")
    faiss = import_faiss(required=True)
    data = ClusteredVectors(dim=args.dim, clusters=args.clusters, intrinsic_dim=args.intrinsic_dim,
                            spread=args.spread, noise=args.noise, seed=args.seed)
    rows = []
    for size in sizes:
        rows += bench_size(args, data, size, nprobes)
    setup = (f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
             f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads); {args.dim}-d vectors, "
             f"{args.clusters} clusters (intrinsic dim {args.intrinsic_dim}, spread {args.spread}, noise {args.noise}), "
             f"seed {args.seed}; latency over {args.timed} single queries, recall over {args.queries}; "
             f"exact on {args.device}")
    limit = exact_limit(rows, args.budget_ms)
    summary = "" if limit is None else (f"exact search reaches a median of {args.budget_ms:g} ms per query at about "
                                        f"{limit:,} gallery vectors (a line through the exact rows)")
    print(setup + "\n")
    table = markdown(rows, args.k)
    print(table)
    if summary:
        print("\n" + summary)
    if args.markdown:
        write_page(args.markdown, "Gallery search: exact vs FAISS IVF-Flat", table,
                   program="tools.bench_search", argv=args.command_argv, notes=f"{setup}.\n\n{summary}")
    return rows


if __name__ == "__main__":
    main()
