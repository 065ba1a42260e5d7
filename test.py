"""Evaluate a trained PuXIM checkpoint on the unseen classes (zero-shot SBIR).

    python test.py --exp NAME                 # uses results/NAME/best.pth
    python test.py --checkpoint PATH [--data_path ROOT]

The checkpoint's own saved arguments rebuild the model and the dataset split, so nothing else is
needed. Writes ``metrics.json`` (every metric, its convention, the checkpoint, the split, the counts)
and ``per_class.csv`` beside the checkpoint's experiment, and prints a short table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import engine
from utils.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from utils.config import AMP_MODES, DEVICES, DataConfig, RunConfig, RuntimeConfig, config_from_checkpoint
from utils.io import atomic_write
from utils.logger import setup_logging
from utils.metrics import chance_ratios, metric_conventions
from utils.runtime import UserError, run_cli, select_amp, select_device

log = logging.getLogger("test")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PuXIM evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--exp", default=RuntimeConfig.exp, help="experiment name: reads OUTPUT_DIR/EXP/best.pth")
    p.add_argument("--output_dir", default=RuntimeConfig.output_dir)
    p.add_argument("--checkpoint", default=None, help="a checkpoint file (overrides --exp's best.pth)")
    p.add_argument("--out", default=None, help="folder for metrics.json/per_class.csv (default: the experiment's)")
    p.add_argument("--data_path", default=None, help="override the dataset root saved in the checkpoint")
    p.add_argument("--synthetic_dir", default=None, help="override the synthetic benchmark cache folder")
    p.add_argument("--eval_per_class", type=int, default=None, help="quick check: at most N items per class")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=DataConfig.num_workers)
    p.add_argument("--device", default=RuntimeConfig.device, choices=DEVICES)
    p.add_argument("--gpu", default=RuntimeConfig.gpu)
    p.add_argument("--amp", default="none", choices=AMP_MODES,
                   help="autocast of the embeddings; none = fp32, the reported numbers' precision (bf16: faster "
                        "on GPUs, mAP may move in the 3rd decimal)")
    p.add_argument("--save_features", action="store_true", help="also write features.npz (embeddings + labels)")
    p.add_argument("--no_progress", action="store_true")
    return p


def eval_config_from_checkpoint(ckpt: dict, args: argparse.Namespace, source: str) -> RunConfig:
    """The configuration the checkpoint was trained with, with this command's overrides applied."""
    config = config_from_checkpoint(ckpt, source)
    # Embedding needs only the trained encoder: no pretrained ViT, no download.
    overrides = dict(eval_per_class=args.eval_per_class, testall=args.eval_per_class is None,
                     no_progress=args.no_progress, vit_weights=None)
    if args.data_path is not None:
        overrides["data_path"] = args.data_path
    if args.synthetic_dir is not None:
        overrides["synthetic_dir"] = args.synthetic_dir
    return config.replace(**overrides)


def user_errors() -> tuple:
    """What test.py reports as a message and exit status 2 (with UserError), not as a traceback."""
    from datasets.filelist import DatasetError

    return (CheckpointError, DatasetError)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    return run_cli(run, args, user_errors=user_errors, report=log)


def run(args) -> dict:
    from datasets import build_datasets
    from datasets.robust import AccountedImages, collate_skipping
    from models import build_model

    exp_dir = Path(args.output_dir) / args.exp
    ckpt_path = Path(args.checkpoint) if args.checkpoint else exp_dir / "best.pth"
    out_dir = Path(args.out) if args.out else (exp_dir if not args.checkpoint else ckpt_path.parent)
    if out_dir.exists() and not out_dir.is_dir():  # found now, not after the whole evaluation
        raise UserError(f"--out {out_dir} is a file: give a folder for metrics.json and per_class.csv.")
    ckpt = load_checkpoint(ckpt_path)
    config = eval_config_from_checkpoint(ckpt, args, str(ckpt_path))
    device = select_device(args)
    amp_dtype = select_amp(args, device)

    data = build_datasets(config)
    model = build_model(config, with_sampler=False).to(device)
    load_model_weights(model, ckpt["model"], source=str(ckpt_path))
    loader_kw = dict(batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                     pin_memory=device.type == "cuda", collate_fn=collate_skipping)
    class_names = sorted(data["class_to_idx"], key=data["class_to_idx"].get)
    result = engine.evaluate(
        model, DataLoader(AccountedImages(data["query"]), **loader_kw),
        DataLoader(AccountedImages(data["gallery"]), **loader_kw),
        device=device, amp_dtype=amp_dtype, class_names=class_names, progress=not args.no_progress,
        return_features=args.save_features,
    )
    metrics, features, unreadable = result.metrics, result.features, result.unreadable
    per_class = metrics.pop("per_class", {})

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "metrics": metrics,
        "conventions": metric_conventions(),
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
        "checkpoint": str(ckpt_path),
        "checkpoint_epoch": ckpt.get("next_epoch", 0) - 1,
        "arch": config.model.arch,
        "split": {"data_path": config.data.data_path or "synthetic", "dataset": config.data.dataset,
                  "test_class": config.data.test_class, "unseen_classes": class_names,
                  "testall": config.data.testall, "eval_per_class": config.data.eval_per_class},
        "num_queries": metrics["num_queries"],
        "num_gallery": metrics["num_gallery"],
        # Every listed item is accounted for: evaluated, or named here with the reason.
        "listed": {"queries": len(data["query"]), "gallery": len(data["gallery"])},
        "not_evaluated": {kind: [{"path": p, "reason": r} for p, r in items] for kind, items in unreadable.items()},
    }
    with atomic_write(out_dir / "metrics.json") as f:  # whole or not at all: the file other tools read
        f.write(json.dumps(report, indent=2))
    write_per_class(out_dir / "per_class.csv", per_class, class_names, data["query"])
    if features is not None:
        np.savez_compressed(out_dir / "features.npz", **{k: v.numpy() for k, v in features.items()},
                            class_names=np.array(class_names))
    print_table(metrics, ckpt_path)
    log.info("wrote %s and %s", out_dir / "metrics.json", out_dir / "per_class.csv")
    return report


def write_per_class(path: Path, per_class: dict, class_names: list, queries) -> None:
    """per_class.csv: each unseen class's mAP@all, and its number of queries where the dataset knows its labels."""
    q_counts = np.bincount(np.asarray(queries.labels), minlength=len(class_names)) \
        if hasattr(queries, "labels") else None
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["class", "mAP@all"] + (["queries"] if q_counts is not None else []))
        for i, name in enumerate(class_names):
            row = [name, f"{per_class.get(name, float('nan')):.6f}"]
            w.writerow(row + ([int(q_counts[i])] if q_counts is not None else []))


def print_table(metrics: dict, ckpt_path: Path) -> None:
    rows = [("mAP@all", "AP over the full ranking"),
            ("P@100", "fraction relevant in the top 100"),
            ("mAP@200", "AP@200, torchmetrics normaliser (PuXIM code)"),
            ("mAP@200_sake", "AP@200, SAKE/ZSE-SBIR convention"),
            ("P@200", "fraction relevant in the top 200"),
            ("chance_mAP", "fraction of the gallery that is relevant")]
    print(f"\nZero-shot retrieval, {metrics['num_queries']} sketch queries x {metrics['num_gallery']} photos "
          f"({ckpt_path})")
    for key, what in rows:
        if key in metrics:
            print(f"  {key:<13} {metrics[key]:.4f}   {what}")
    comparison = chance_ratios(metrics)
    if comparison is not None:
        ratios, verdict = comparison
        print(f"  mAP@all is {ratios['mAP@all']:.2f}x and P@100 {ratios['P@100']:.2f}x the chance level: "
              f"{verdict}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
