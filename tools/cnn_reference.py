"""How far does a small CNN get on a benchmark? A yardstick for "the preset learns wherever a small model can".

    python -m tools.cnn_reference --data_path ROOT --dataset sketchy_extend --custom_split

A benchmark on which a small, well-conditioned model does not beat chance says little about a
preset; one on which it does, and the preset does not, points at the preset. This tool trains such a
model with the tiny preset's budget (16,000 triplets at 64 px, batch 32) and evaluates it once, on the
same unseen split, with the same metrics, so that ``tools.learning_matrix`` can put the two side by side.

The model: four 3x3 stride-2 convolutions (32-64-128-256 channels) with a BatchNorm per modality after
each (``models.encoder.ModalityBatchNorm2d``), ReLU, global average pooling and a linear map to 128-d,
shared by sketches and photos; L2-normalised embeddings. The loss is the triplet loss on cosine distance
(margin 0.2) plus a cross-entropy over the *seen* classes (a cosine classifier, scale 16) on the sketch
and both photos. Both choices are what made the yardstick strongest in our measurements: without the
cross-entropy the CNN does not fit the seen triplets from scratch either (triplet loss near the margin).
``--input_norm photo`` standardises each photo on its own first (``models.encoder.standardize_images``,
as the tiny preset does); the default feeds photos as they are, as the learning matrix's column was measured.
Images are decoded once and kept in memory; triplets are drawn as ``datasets.TripletDataset`` draws
them (class, positive of that class, negative of another), from a generator seeded by ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from utils.progress import progress_bar

from datasets import build_datasets, load_image, preprocess_photo, preprocess_sketch
from datasets.filelist import DatasetError
from models.encoder import ModalityBatchNorm2d, check_input_norm, standardize_images
from utils.config import INPUT_NORMS, make_config
from utils.io import atomic_write
from utils.metrics import chance_level, retrieval_metrics
from utils.runtime import run_cli

__all__ = ["SmallCNN", "train_reference", "get_args_parser", "main"]


class SmallCNN(nn.Module):
    """Four stride-2 convs with per-modality BatchNorm, global average pooling, a linear embedding."""

    def __init__(self, *, widths: tuple[int, ...] = (32, 64, 128, 256), embed_dim: int = 128):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), ModalityBatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(c, embed_dim)

    def forward(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        ModalityBatchNorm2d.set_modality(self.features, modality)
        x = self.features(images).mean((2, 3))  # [B, C]
        return F.normalize(self.embed(x), dim=1)  # [B, E]


def _load_all(paths, preprocess, size: int, desc: str, progress: bool, standardize: bool = False) -> torch.Tensor:
    images = torch.stack([preprocess(load_image(p), size)
                          for p in progress_bar(paths, desc=desc, enabled=progress, leave=False)])  # [N, 3, S, S]
    return standardize_images(images) if standardize else images


def train_reference(data: dict, *, steps: int = 500, batch_size: int = 32, lr: float = 1e-3,
                    image_size: int = 64, seed: int = 0, progress: bool = False, input_norm: str = "none") -> dict:
    """Train ``SmallCNN`` on ``data`` (``datasets.build_datasets``'s dict) and evaluate it on the unseen split.

    ``input_norm="photo"``: every photo standardised on its own (``models.encoder.standardize_images``).
    """
    standardize = check_input_norm(input_norm) == "photo"
    torch.manual_seed(seed)
    split = data["split"]
    classes = sorted(c for c in split.train_photos if split.train_sketches.get(c))
    if len(classes) < 2:
        raise DatasetError("the reference needs at least two seen classes with both sketches and photos")
    sketches = {c: _load_all(split.train_sketches[c], preprocess_sketch, image_size, c, progress) for c in classes}
    photos = {c: _load_all(split.train_photos[c], preprocess_photo, image_size, c, progress, standardize)
              for c in classes}
    model = SmallCNN()
    classifier = nn.Linear(model.embed.out_features, len(classes), bias=False)
    optimizer = torch.optim.Adam([*model.parameters(), *classifier.parameters()], lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)

    def pick(pool: dict, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([pool[classes[i]][int(torch.randint(len(pool[classes[i]]), (1,), generator=gen))]
                            for i in idx.tolist()])  # [B, 3, S, S]

    start = time.perf_counter()
    for _ in progress_bar(range(steps), desc="reference CNN", enabled=progress, leave=False):
        pos = torch.randint(len(classes), (batch_size,), generator=gen)
        neg = (pos + torch.randint(1, len(classes), (batch_size,), generator=gen)) % len(classes)
        s, p, n = model(pick(sketches, pos), "sketch"), model(pick(photos, pos), "photo"), model(pick(photos, neg), "photo")
        # 1 - s.p on unit vectors: losses.cosine_distance in value, kept in this form for the yardstick's figures
        # (docs/results/learning_matrix.md)
        loss_tri = F.triplet_margin_with_distance_loss(
            s, p, n, distance_function=lambda x, y: 1 - (x * y).sum(1), margin=0.2)
        logits = 16 * F.normalize(classifier.weight, dim=1) @ torch.cat([s, p, n]).T  # [K, 3B]
        loss_ce = F.cross_entropy(logits.T, torch.cat([pos, pos, neg]))
        optimizer.zero_grad(set_to_none=True)
        (loss_tri + loss_ce).backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start

    model.eval()
    query, gallery = data["query"], data["gallery"]
    with torch.no_grad():
        q = model(_load_all([p for p, _ in query.items], preprocess_sketch, image_size, "queries", progress), "sketch")
        g = model(_load_all([p for p, _ in gallery.items], preprocess_photo, image_size, "gallery", progress,
                            standardize), "photo")
    metrics = retrieval_metrics(q, query.labels, g, gallery.labels)
    return {"mAP@all": float(metrics["mAP@all"]), "P@100": float(metrics["P@100"]),
            "chance": chance_level(query.labels, gallery.labels), "train_seconds": round(train_seconds, 1),
            "final_loss_tri": float(loss_tri.detach()), "final_loss_ce": float(loss_ce.detach()), "steps": steps, "seed": seed,
            "input_norm": input_norm}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Train the small-CNN yardstick on a benchmark",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", default=None, help="dataset root; omit for the built-in synthetic benchmark")
    p.add_argument("--dataset", default="sketchy_extend")
    p.add_argument("--test_class", default="test_class_sketchy25")
    p.add_argument("--custom_split", action="store_true", help="take the split's unseen classes as written")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (the tiny preset: 10 x 1,600 / 32)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input_norm", default="none", choices=INPUT_NORMS,
                   help="photo: standardise each photo on its own, as the tiny preset does")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0:
        print("cnn_reference: error: --steps and --batch_size must be positive", file=sys.stderr)
        return 2
    return run_cli(_run, args, user_errors=(DatasetError,), raise_exit=False,
                   report=lambda message: print(f"cnn_reference: error: {message}", file=sys.stderr))


def _run(args) -> int:
    # The PuXIM run's data path (its split and evaluation sets); the triplet stream is not used here.
    config = make_config("tiny", data_path=args.data_path, dataset=args.dataset, test_class=args.test_class,
                         custom_split=args.custom_split, image_size=args.image_size, seed=args.seed, datasetLen=1,
                         no_progress=args.no_progress, w_inst=0.0, augment="none")
    data = build_datasets(config)
    result = train_reference(data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             image_size=args.image_size, seed=args.seed, progress=not args.no_progress,
                             input_norm=args.input_norm)
    ratio = result["mAP@all"] / max(result["chance"], 1e-12)
    print(f"small-CNN reference: unseen mAP@all {result['mAP@all']:.4f} ({ratio:.2f}x chance {result['chance']:.3f}), "
          f"P@100 {result['P@100']:.4f}, {result['train_seconds'] / 60:.1f} min of training")
    if args.json:
        with atomic_write(args.json) as f:  # the learning matrix reads it: whole or not at all
            f.write(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
