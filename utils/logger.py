"""Where a run's numbers go: the console (``logging``), TensorBoard, and ``log.txt`` (JSON lines).

Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path


def setup_logging(output_dir: str | Path | None = None, *, rank: int = 0, level=logging.INFO) -> None:
    """Console logging for rank 0 (warnings only on other ranks), plus ``output_dir/train.log``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_puxim", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    handlers = [console]
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log", encoding="utf-8"))
        handlers[-1].setFormatter(fmt)
    for h in handlers:
        h._puxim = True
        root.addHandler(h)


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class ExperimentLogger:
    """TensorBoard scalars/images under ``output_dir/tb`` and one JSON line per epoch in ``log.txt``."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # import here: tensorboard is slow to import

            self.writer = SummaryWriter(log_dir=str(self.output_dir / "tb"), purge_step=purge_step)

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if not self.writer:
            return
        for k, v in values.items():
            v = _jsonable(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def image(self, tag: str, image_hwc, step: int) -> None:
        """Add an ``[H, W, 3]`` uint8 array as an image."""
        if self.writer:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def epoch_line(self, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.output_dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in values.items()}) + "\n")

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None



class TrainingPictures:
    """TensorBoard images at every evaluation: top-5 retrievals of a few fixed unseen sketches, and the VxL masks
    of a few fixed training photos."""

    def __init__(self, data: dict, *, seed: int, image_size: int):
        from utils.visualize import select_items

        self.data, self.image_size = data, image_size
        self.queries = select_items(data["query"].items, 4, seed=seed)
        self.photos = select_items([(p, c) for c, ps in data["split"].train_photos.items() for p in ps], 4, seed=seed)

    def log(self, exp_logger: ExperimentLogger, model, features: dict, *, device, step: int) -> None:
        from utils.checkpoint import strip_wrappers
        from utils.visualize import mask_summary, retrieval_summary

        net = strip_wrappers(model)
        grid = retrieval_summary(net, self.queries, features["gallery"], self.data["gallery"].items,
                                 image_size=self.image_size, device=device, topk=5)
        exp_logger.image("test/retrieval", grid, step)
        if net.sampler is not None:
            exp_logger.image("train/vxl_masks", mask_summary(net.sampler, self.photos, image_size=self.image_size),
                             step)
