"""Does a preset learn beyond the benchmark it was tuned on? Train it on the procedural family and tabulate.

    python -m tools.learning_matrix                            # the 9 benchmarks x 2 seeds, the tiny preset
    python -m tools.learning_matrix --benchmarks issue_flat_noisy --seeds 0 --train_args "--epoch 2"

Every cell draws one benchmark of ``datasets.family`` (cached under ``--data_dir``), trains
``train.py --arch tiny`` on it with the preset's default schedule (``--train_args`` adds flags),
evaluates once after the last epoch, and reads the unseen-class mAP@all and P@100 with the chance
level (the fraction of the gallery that is relevant). The table gives both as multiples of chance
(P@100 also with the best ratio possible: with fewer than 100 photos per unseen class even a perfect
ranking scores below 1); the last line says whether the mAP@all of every cell reaches 1.5x chance
and the median 2x.

``--reference cnn`` (the default) also trains ``tools.cnn_reference``'s small CNN on every cell, with the
same budget, as a yardstick of the benchmark itself: where that CNN does not beat chance either, the
benchmark is beyond what a small model learns in this budget, and the preset's figure says little;
where it does and the preset does not, the preset is at fault. The table shows both, and the last
line also counts the cells where the CNN reaches 1.5x and how many of them the preset reaches too.

Cells run one after another in subprocesses (``--jobs N`` runs N at once, each with its share of the
CPU threads). A cell that fails to draw or train is reported by name with the reason, the others go
on, and the exit status is 1. Runs land in ``--out/<benchmark>_s<seed>/`` (train.py's usual folder).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from datasets.family import FAMILY, make_family_benchmark
from datasets.synthetic import default_cache_dir
from tools.results_page import add_markdown_flag, write_page
from utils.health import alarm_in

TARGET_MIN, TARGET_MEDIAN = 1.5, 2.0
ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Train a preset on the benchmark family and tabulate learning",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmarks", nargs="+", default=list(FAMILY), help=f"names from {list(FAMILY)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (--seed of train.py)")
    p.add_argument("--arch", default="tiny", help="preset to train")
    p.add_argument("--train_args", default="", help="extra train.py flags for every cell, e.g. '--epoch 2'")
    p.add_argument("--data_dir", default=None,
                   help="where the benchmarks are drawn (default: $PUXIM_CACHE/family or ~/.cache/puxim/family)")
    p.add_argument("--out", default="results/learning_matrix", help="experiment folders and the table")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once")
    p.add_argument("--reference", default="cnn", choices=("cnn", "none"),
                   help="also train the small-CNN yardstick (tools.cnn_reference) on every cell")
    p.add_argument("--reference_args", default="", help="extra tools.cnn_reference flags, e.g. '--steps 100'")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: tabulate the cells whose runs are already in --out (e.g. after an "
                        "interrupted matrix); cells without a finished run are listed as missing")
    add_markdown_flag(p, "the table and its verdict")
    return p


def draw(name: str, data_dir: str | None, progress: bool = True) -> tuple[Path, str | None]:
    """Draw benchmark ``name`` (kept when already drawn); ``(root, None)``, or ``(root, why it failed)``."""
    root = (Path(data_dir).expanduser() if data_dir else default_cache_dir() / "family") / name
    try:
        make_family_benchmark(root, FAMILY[name], progress=progress)
    except Exception as e:  # noqa: BLE001 - reported by the cells of this benchmark, the matrix goes on
        return root, f"drawing the benchmark into {root} failed: {type(e).__name__}: {e}"
    return root, None


def run_cell(name: str, seed: int, root: Path, args, threads: int) -> dict:
    """Train one cell on the benchmark drawn at ``root``; return its metrics, or ``error`` naming what failed."""
    cell = {"benchmark": name, "seed": seed}
    spec = FAMILY[name]
    exp = f"{name}_s{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--exp", exp, "--output_dir", str(args.out), "--overwrite",
           "--data_path", str(root), "--dataset", spec.dataset, "--test_class", spec.test_class, "--custom_split",
           "--arch", args.arch, "--seed", str(seed), "--eval_every", "1000000", "--no_progress", "--no_tb_images",
           *shlex.split(args.train_args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    error = _run("train.py", cmd, env, lines=3)
    cell["seconds"] = round(time.perf_counter() - start, 1)
    if error is None and not (Path(args.out) / exp / "log.txt").is_file():
        error = f"train.py wrote no {Path(args.out) / exp / 'log.txt'}"
    if error is not None:
        return {**cell, "error": error}
    if args.reference == "cnn":
        run_reference(name, seed, root, args, env)
    return read_cell(args.out, name, seed, seconds=cell["seconds"])


def _run(what: str, cmd: list[str], env: dict, *, lines: int) -> str | None:
    """Run ``cmd`` in the repository; None when it succeeds, else the exit status and its last output lines."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-lines:]
    return f"{what} exited {proc.returncode}: " + " | ".join(tail)


def reference_path(out: Path, name: str, seed: int) -> Path:
    return Path(out) / "reference" / f"{name}_s{seed}.json"


def run_reference(name: str, seed: int, root: Path, args, env: dict) -> None:
    """Train the small-CNN yardstick on one cell; its result (or why it failed) goes to reference/<cell>.json."""
    spec = FAMILY[name]
    path = reference_path(args.out, name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tools.cnn_reference", "--data_path", str(root), "--dataset", spec.dataset,
           "--test_class", spec.test_class, "--custom_split", "--seed", str(seed), "--json", str(path),
           "--no_progress", *shlex.split(args.reference_args)]
    error = _run("tools.cnn_reference", cmd, env, lines=2)
    if error is not None:
        path.write_text(json.dumps({"error": error}))


def read_cell(out: Path, name: str, seed: int, seconds: float | None = None) -> dict:
    """A finished cell's figures from its experiment folder (the last line of log.txt, train.log)."""
    cell = {"benchmark": name, "seed": seed}
    spec = FAMILY[name]
    folder = Path(out) / f"{name}_s{seed}"
    lines = (folder / "log.txt").read_text().strip().splitlines() if (folder / "log.txt").is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    if "test_chance_mAP" not in last:
        return {**cell, "error": f"no finished run in {folder}"}
    if seconds is None:  # the epochs' training time (no drawing, no start-up)
        seconds = sum(json.loads(line).get("train_epoch_time", 0.0) for line in lines)
    cell["seconds"] = round(seconds, 1)
    train_log = (folder / "train.log").read_text() if (folder / "train.log").is_file() else ""
    chance = last["test_chance_mAP"]
    # P@100 divides by 100: with fewer than 100 photos per unseen class it cannot reach 1.
    p100_best = min(spec.per_class, 100) / 100
    cell.update({"mAP@all": last["test_mAP@all"], "P@100": last["test_P@100"], "chance": chance,
                 "mAP_x": last["test_mAP@all"] / chance, "P100_x": last["test_P@100"] / chance,
                 "P100_x_max": p100_best / chance,
                 "triplet_acc": last.get("train_triplet_acc"), "emb_spread": last.get("train_emb_spread"),
                 "health_alarm": alarm_in(train_log)})
    ref_path = reference_path(out, name, seed)
    if ref_path.is_file():
        ref = json.loads(ref_path.read_text())
        cell["reference"] = ref if "error" in ref else {**ref, "mAP_x": ref["mAP@all"] / ref["chance"]}
    return cell


def format_table(cells: list[dict]) -> str:
    lines = ["| benchmark | seed | unseen mAP@all (x chance) | P@100 (x chance; best possible) | chance | "
             "train triplet acc | train emb spread | health alarm | minutes | small-CNN reference mAP@all |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['benchmark']} | {c['seed']} | FAILED: {c['error']} | | | | | | | |")
            continue
        ref = c.get("reference")
        ref_text = ("" if ref is None else f"FAILED: {ref['error']}" if "error" in ref
                    else f"{ref['mAP@all']:.3f} ({ref['mAP_x']:.2f}x)")
        acc = "" if c.get("triplet_acc") is None else f"{c['triplet_acc']:.2f}"
        spread = "" if c.get("emb_spread") is None else f"{c['emb_spread']:.3f}"
        lines.append(f"| {c['benchmark']} | {c['seed']} | {c['mAP@all']:.3f} ({c['mAP_x']:.2f}x) | "
                     f"{c['P@100']:.3f} ({c['P100_x']:.2f}x; {c['P100_x_max']:.2f}x) | {c['chance']:.3f} | {acc} | "
                     f"{spread} | {c.get('health_alarm') or 'no'} | {c['seconds'] / 60:.1f} | {ref_text} |")
    return "\n".join(lines)


def verdict(cells: list[dict]) -> tuple[str, bool]:
    done = [c for c in cells if "error" not in c]
    if not done:
        return "no cell finished", False
    ratios = [c["mAP_x"] for c in done]
    worst, median = min(ratios), statistics.median(ratios)
    ok = worst >= TARGET_MIN and median >= TARGET_MEDIAN and len(done) == len(cells)
    text = (f"{len(done)}/{len(cells)} cells finished; unseen mAP@all over chance: min {worst:.2f}x "
            f"(target >= {TARGET_MIN}x), median {median:.2f}x (target >= {TARGET_MEDIAN}x): "
            f"{'targets met' if ok else 'targets NOT met'}")
    learnable = [c for c in done if "mAP_x" in c.get("reference", {}) and c["reference"]["mAP_x"] >= TARGET_MIN]
    with_ref = [c for c in done if "mAP_x" in c.get("reference", {})]
    if with_ref:
        reached = sum(c["mAP_x"] >= TARGET_MIN for c in learnable)
        text += (f"\nthe small-CNN reference reaches {TARGET_MIN}x on {len(learnable)}/{len(with_ref)} cells "
                 f"(median {statistics.median(c['reference']['mAP_x'] for c in with_ref):.2f}x); "
                 f"the preset reaches {TARGET_MIN}x on {reached} of those")
    return text, ok


def write_markdown(path, table: str, text: str, arch: str, argv: list[str] | None) -> Path:
    """The matrix as a results page: its table (:func:`format_table`) and verdict (:func:`verdict`), with the date,
    commit, machine and command (``argv`` None: this process's)."""
    return write_page(path, f"Learning matrix: the {arch} preset on the benchmark family", table,
                      program="tools.learning_matrix", argv=argv,
                      notes=text.replace("\n", "\n\n") + "\n\nminutes: training time of the cell (its epochs).")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    args.command_argv = argv  # None: the page gives this process's command line
    unknown = [b for b in args.benchmarks if b not in FAMILY]
    if unknown:
        print(f"learning_matrix: error: unknown benchmark(s) {unknown}; choose from {list(FAMILY)}", file=sys.stderr)
        return 2
    args.out = Path(args.out).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    cells_todo = [(b, s) for b in args.benchmarks for s in args.seeds]
    if args.report_only:
        cells = [read_cell(args.out, b, s) for b, s in cells_todo]
        return _report(cells, args)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    # Each benchmark is drawn once, before the cells of its seeds run (perhaps in parallel).
    drawn = {name: draw(name, args.data_dir) for name in dict.fromkeys(args.benchmarks)}

    def train_cell(name: str, seed: int) -> dict:
        root, error = drawn[name]
        return {"benchmark": name, "seed": seed, "error": error} if error else run_cell(name, seed, root, args, threads)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(train_cell, b, s) for b, s in cells_todo]
        cells = []
        for f in futures:
            cell = f.result()
            cells.append(cell)
            shown = cell.get("error") or (f"mAP@all {cell['mAP_x']:.2f}x, P@100 {cell['P100_x']:.2f}x chance "
                                           f"({cell['seconds'] / 60:.1f} min)")
            print(f"[{len(cells)}/{len(cells_todo)}] {cell['benchmark']} seed {cell['seed']}: {shown}", flush=True)
    return _report(cells, args)


def _report(cells: list[dict], args) -> int:
    table = format_table(cells)
    text, ok = verdict(cells)
    (args.out / "matrix.md").write_text(table + "\n\n" + text + "\n")
    (args.out / "matrix.json").write_text(json.dumps({"cells": cells, "verdict": text, "train_args": args.train_args,
                                                       "arch": args.arch}, indent=1))
    print(table)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, table, text, args.arch, args.command_argv)
    failed = [c for c in cells if "error" in c]
    for c in failed:
        print(f"cell {c['benchmark']} seed {c['seed']} FAILED: {c['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
