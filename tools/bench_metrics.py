"""Benchmark utils.metrics.retrieval_metrics against the released code's evaluation procedure.

    python -m tools.bench_metrics                       # Sketchy-25 size: 15,229 x 17,101, 768-d
    python -m tools.bench_metrics --device cuda --ref_queries 500

Features are random but class-structured (class centre + Gaussian noise), so the APs are neither 0
nor 1. The "reference procedure" is what the PuXIM code does per query: ``F.cosine_similarity`` of
one query against the gallery, then torchmetrics-style ``retrieval_average_precision`` twice (full
ranking, and top 200), each sorting the scores. It is re-implemented plainly below (the classic
torchmetrics formula, without the ``preds > 0`` filter that makes today's torchmetrics return 0 on
the reference's ``cos - 1`` scores), timed on ``--ref_queries`` queries and scaled to all queries.
It computes two AP numbers per query only (no P@K), so the speed-up printed is a lower bound.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from tools.results_page import add_markdown_flag, write_page
from utils.metrics import metrics_from_ranks, relevant_ranks, retrieval_metrics


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Benchmark the retrieval metrics", add_help=True)
    p.add_argument("--queries", type=int, default=15229, help="number of queries (Sketchy-25 sketches)")
    p.add_argument("--gallery", type=int, default=17101, help="gallery size (Sketchy-25 photos)")
    p.add_argument("--classes", type=int, default=25)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--noise", type=float, default=4.0,
                   help="per-dimension noise std around unit-variance class centres (sets the APs)")
    p.add_argument("--ref_queries", type=int, default=200,
                   help="queries run through the reference procedure (its time is scaled to all)")
    p.add_argument("--chunk_size", type=int, default=1024)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    add_markdown_flag(p)
    return p


def make_features(num: int, labels: torch.Tensor, centres: torch.Tensor, noise: float,
                  gen: torch.Generator) -> torch.Tensor:
    """Class centre plus isotropic noise: ``[num, D]`` float32."""
    return centres[labels] + noise * torch.randn(num, centres.shape[1], generator=gen)


def torchmetrics_style_ap(preds: torch.Tensor, target: torch.Tensor, top_k: int | None = None,
                          stable: bool = False) -> torch.Tensor:
    """torchmetrics' retrieval_average_precision for one query (classic formula, float32).

    Sort by score (topk, sorted), keep the top k, and average ``hits / position`` over the relevant
    positions; 0 when no relevant item is in the top k. ``stable=True`` orders exact ties by
    gallery index (our convention) instead of topk's unspecified order.
    """
    top_k = top_k or preds.shape[-1]
    if stable:
        order = torch.sort(-preds, stable=True).indices[:top_k]
    else:
        order = preds.topk(min(top_k, preds.shape[-1]), sorted=True, dim=-1)[1]
    target = target[order]
    if not target.sum():
        return torch.tensor(0.0, device=preds.device)
    positions = torch.arange(1, len(target) + 1, device=target.device, dtype=torch.float32)[target > 0]
    return (torch.arange(len(positions), device=positions.device, dtype=torch.float32) + 1).div(positions).mean()


def reference_procedure(q: torch.Tensor, q_lab: torch.Tensor, g: torch.Tensor, g_lab: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: cosine similarity to the gallery, then AP@all and AP@200. Returns two ``[n]``."""
    ap_all, ap_200 = [], []
    for i in range(q.shape[0]):
        sim = F.cosine_similarity(q[i:i + 1], g)                              # [G]
        target = g_lab == q_lab[i]                                            # [G]
        ap_all.append(torchmetrics_style_ap(sim, target))
        ap_200.append(torchmetrics_style_ap(sim, target, top_k=200))
    return torch.stack(ap_all), torch.stack(ap_200)


def ours_per_query(q: torch.Tensor, q_lab: torch.Tensor, g: torch.Tensor, g_lab: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Our per-query AP@all and AP@200 (same ranking code as retrieval_metrics)."""
    sims = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T                  # [n, G]
    ap_all, ap_200 = [], []
    for i in range(q.shape[0]):
        rel_idx = (g_lab == q_lab[i]).nonzero().squeeze(1)                    # [R]
        ranks = relevant_ranks(sims[i:i + 1], rel_idx) if rel_idx.numel() else \
            torch.zeros((1, 0), dtype=torch.long, device=q.device)
        m = metrics_from_ranks(ranks, g.shape[0], ks_map=(200,), ks_precision=())
        ap_all.append(m["mAP@all"][0])
        ap_200.append(m["mAP@200"][0])
    return torch.stack(ap_all), torch.stack(ap_200)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_problem(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(q [Nq, D], q_lab [Nq], g [Ng, D], g_lab [Ng])`` on ``device``: class-structured random features
    drawn from ``args.seed``."""
    gen = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.classes, args.dim, generator=gen)                 # [C, D]
    q_lab = torch.randint(args.classes, (args.queries,), generator=gen)          # [Nq]
    g_lab = torch.randint(args.classes, (args.gallery,), generator=gen)          # [Ng]
    q = make_features(args.queries, q_lab, centres, args.noise, gen).to(device)  # [Nq, D]
    g = make_features(args.gallery, g_lab, centres, args.noise, gen).to(device)  # [Ng, D]
    return q, q_lab.to(device), g, g_lab.to(device)


def time_ours(args, q, q_lab, g, g_lab, device: torch.device) -> tuple[dict, list[float], list[float], float]:
    """Every metric on all queries, twice (the first run pays one-off costs); prints times and memory.

    Returns ``(metrics, wall times, CPU times, peak RSS in MiB)``.
    """
    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(2):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = retrieval_metrics(q, q_lab, g, g_lab, chunk_size=args.chunk_size, device=device)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    rss_ours = _rss_mb()
    print("ours, all metrics (" + ", ".join(k for k in metrics if not k.startswith("num_")) + "):")
    print(f"  time: run 1 {times[0]:.2f} s, run 2 {times[1]:.2f} s "
          f"(CPU time of this process, all threads: {cpu_times[0]:.2f} s, {cpu_times[1]:.2f} s)")
    print("  " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if not k.startswith("num_")))
    print(f"  peak RSS: {rss_ours:.0f} MiB (before: {rss_before:.0f} MiB)")
    if device.type == "cuda":
        print(f"  peak CUDA allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return metrics, times, cpu_times, rss_ours


def time_reference(q, q_lab, g, g_lab, device: torch.device, n_ref: int, times: list[float]
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The reference procedure on the first ``n_ref`` queries, its time scaled to all queries and compared
    with ours (``times``). Returns ``(AP@all [n_ref], AP@200 [n_ref], scaled time)``."""
    num_queries = q.shape[0]
    _sync(device)
    t0 = time.perf_counter()
    ref_all, ref_200 = reference_procedure(q[:n_ref], q_lab[:n_ref], g, g_lab)
    _sync(device)
    t_ref = time.perf_counter() - t0
    t_ref_all = t_ref * num_queries / n_ref
    best = min(times)
    print("reference procedure (per-query cosine + torchmetrics-style AP@all and AP@200):")
    print(f"  time: {t_ref:.2f} s on {n_ref} queries -> {t_ref_all:.1f} s scaled to {num_queries}")
    print(f"  speed-up of ours: {t_ref_all / times[0]:.1f}x (run 1), {t_ref_all / best:.1f}x (best run)")
    return ref_all, ref_200, t_ref_all


def check_agreement(q, q_lab, g, g_lab, device: torch.device, ref_all: torch.Tensor, ref_200: torch.Tensor
                    ) -> float:
    """Compare ours with the reference on its ``n_ref = len(ref_all)`` queries, per query and in the mean;
    prints the differences and returns the largest."""
    n_ref = len(ref_all)
    our_all, our_200 = ours_per_query(q[:n_ref], q_lab[:n_ref], g, g_lab)
    d_all = (our_all - ref_all.double()).abs().max().item()
    d_200 = (our_200 - ref_200.double()).abs().max().item()
    sub = retrieval_metrics(q[:n_ref], q_lab[:n_ref], g, g_lab, device=device)
    d_mean = max(abs(sub["mAP@all"] - ref_all.double().mean().item()),
                 abs(sub["mAP@200"] - ref_200.double().mean().item()))
    print(f"agreement on {n_ref} queries: max |AP@all diff| {d_all:.2e}, max |AP@200 diff| {d_200:.2e}, "
          f"|subset mean diff| {d_mean:.2e}")
    explain_worst_query(q[:n_ref], q_lab[:n_ref], g, g_lab, our_all, ref_all)
    return max(d_all, d_200, d_mean)


def explain_worst_query(q, q_lab, g, g_lab, our_all: torch.Tensor, ref_all: torch.Tensor) -> None:
    """Print, for the query whose AP@all differs most, the reference formula redone (a) with exact ties in
    gallery order and (b) on our similarity values too.

    What is left after (b) is the reference's float32 arithmetic; the rest came from topk's order among
    equal scores and from cosine_similarity's rounding, which swaps near-equal scores.
    """
    i = int((our_all - ref_all.double()).abs().argmax())
    target = g_lab == q_lab[i]                                                   # [Ng]
    ref_stable = torchmetrics_style_ap(F.cosine_similarity(q[i:i + 1], g), target, stable=True).item()
    our_sim = (F.normalize(q, dim=1) @ F.normalize(g, dim=1).T)[i]               # [Ng], as in ours_per_query
    ref_stable_our_sim = torchmetrics_style_ap(our_sim, target, stable=True).item()
    print(f"  worst AP@all (query {i}): ours {our_all[i].item():.7f}, reference {ref_all[i].item():.7f}; "
          f"reference formula with ties in gallery order {ref_stable:.7f}, and on our similarities "
          f"{ref_stable_our_sim:.7f}")


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("tools/bench_metrics.py: --device cuda asked for, but torch sees no GPU; use --device cpu")
    q, q_lab, g, g_lab = make_problem(args, device)
    print(f"{args.queries} queries x {args.gallery} gallery, {args.classes} classes, dim {args.dim}, "
          f"device {device}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    metrics, times, cpu_times, rss_ours = time_ours(args, q, q_lab, g, g_lab, device)
    n_ref = min(args.ref_queries, args.queries)
    ref_all, ref_200, t_ref_all = time_reference(q, q_lab, g, g_lab, device, n_ref, times)
    max_abs_diff = check_agreement(q, q_lab, g, g_lab, device, ref_all, ref_200)
    result = {"metrics": metrics, "times": times, "cpu_times": cpu_times, "reference_time_scaled": t_ref_all,
              "peak_rss_mib": rss_ours, "max_abs_diff": max_abs_diff}
    if args.markdown:
        write_page(args.markdown, "Retrieval metrics: vectorised vs the released per-query procedure",
                   markdown_table(args, device, result), program="tools.bench_metrics",
                   argv=argv)
    return result


def markdown_table(args: argparse.Namespace, device: torch.device, result: dict) -> str:
    """The measured figures as a one-row Markdown table."""
    times, cpu = result["times"], result["cpu_times"]
    return "\n".join([
        "| queries × gallery (classes, dim) | device (threads) | ours, run 1 / run 2 (s) | ours, CPU time (s) | "
        "released procedure, scaled (s) | speed-up (run 1) | peak RSS (MiB) | max \\|ΔAP\\| |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| {args.queries:,} × {args.gallery:,} ({args.classes}, {args.dim}) | {device} ({torch.get_num_threads()}) | "
        f"{times[0]:.2f} / {times[1]:.2f} | {cpu[0]:.2f} | {result['reference_time_scaled']:.1f} "
        f"(from {min(args.ref_queries, args.queries)} queries) | {result['reference_time_scaled'] / times[0]:.1f}× | "
        f"{result['peak_rss_mib']:.0f} | {result['max_abs_diff']:.1e} |"])


if __name__ == "__main__":
    main()
