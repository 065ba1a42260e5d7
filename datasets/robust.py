"""Unreadable images during a run: skipped, counted and named — never a crash deep in a worker.

Training: :class:`SkipBadTriplets` catches :class:`ImageLoadError` for triplet ``k`` and draws a
replacement triplet (deterministically: ids ``k + j * STRIDE``), reporting every failed path in the
item's ``bad_files``; :func:`collate_skipping` gathers those lists, and the training loop writes them to
``results/<exp>/bad_files.txt`` and stops once more than ``--max_bad_fraction`` of draws failed.

Evaluation: :class:`AccountedImages` never drops an item silently: an unreadable image comes back with
``ok = False`` and a zero image; the loop leaves it out of the metrics and the metrics file lists it.
"""

from __future__ import annotations

from torch.utils.data import Dataset, default_collate

from .transforms import ImageLoadError

# Far from any id of the same or a neighbouring epoch (ids are epoch * length + i).
REPLACEMENT_STRIDE = 1_000_003_001


class SkipBadTriplets(Dataset):
    """Wrap a :class:`~datasets.sampling.TripletDataset`: unreadable triplets are replaced, and named."""

    def __init__(self, dataset, *, max_attempts: int = 10):
        self.dataset = dataset
        self.max_attempts = int(max_attempts)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # describe(), length, mask_lookup ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, k: int) -> dict:
        bad: list[str] = []
        for attempt in range(self.max_attempts):
            try:
                item = self.dataset[k + attempt * REPLACEMENT_STRIDE]
            except ImageLoadError as e:
                bad.append(" ".join(str(e).split()))  # the message names the path
                continue
            item["bad_files"] = bad
            item["draws"] = attempt + 1
            return item
        raise ImageLoadError(
            f"{self.max_attempts} triplets in a row had unreadable images (triplet {k}); the data is "
            f"badly damaged. Run python -m datasets.prepare --check --verify_images on the root. "
            f"Failures: {bad[:3]}"
        )


class AccountedImages(Dataset):
    """Wrap an :class:`~datasets.sampling.ImageListDataset`; an unreadable image gives ``ok = False``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict:
        try:
            item = self.dataset[index]
            item["ok"] = True
            return item
        except ImageLoadError as e:
            import torch

            path, cls = self.dataset.items[index]
            size = self.dataset.image_size
            return {"image": torch.zeros(3, size, size), "label": self.dataset.class_to_idx[cls],
                    "index": index, "path": path, "ok": False, "error": str(e)}


def collate_skipping(items: list[dict]) -> dict:
    """``default_collate`` for items that carry variable-length ``bad_files`` lists (or ``error``)."""
    bad = [b for it in items for b in it.pop("bad_files", [])]
    errors = [it.pop("error", "") for it in items]
    batch = default_collate(items)
    if bad or "draws" in batch:
        batch["bad_files"] = bad
    if any(errors):
        batch["errors"] = errors
    return batch


class TooManyBadFiles(ImageLoadError):
    """More than the allowed fraction of training draws hit unreadable images."""


class BadFileLog:
    """Counts failed draws, appends each failed path to ``path`` and stops the run past a threshold.

    The run stops (raising :class:`TooManyBadFiles`) once at least ``min_draws`` triplets were drawn
    and more than ``max_fraction`` of them failed: a few damaged files are skipped, a damaged dataset
    is not silently trained on.
    """

    def __init__(self, path, *, max_fraction: float = 0.01, min_draws: int = 200,
                 failed: int = 0, draws: int = 0):
        self.path = path
        self.max_fraction = float(max_fraction)
        self.min_draws = int(min_draws)
        self.failed, self.draws = int(failed), int(draws)

    def update(self, bad: list[str], draws: int) -> None:
        self.failed += len(bad)
        self.draws += int(draws)
        if bad and self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in bad)
        if self.draws >= self.min_draws and self.failed > self.max_fraction * self.draws:
            raise TooManyBadFiles(
                f"{self.failed} of {self.draws} training draws ({100 * self.failed / self.draws:.1f}%) hit "
                f"unreadable images, more than --max_bad_fraction {self.max_fraction}. They are listed in "
                f"{self.path or 'bad_files.txt in the experiment folder'}. Fix or remove them (python -m "
                f"datasets.prepare --check ROOT --verify_images), or raise --max_bad_fraction."
            )

    def state_dict(self) -> dict:
        """The counts a checkpoint keeps, so a resumed run goes on counting (the file list is on disk)."""
        return {"failed": self.failed, "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.failed, self.draws = int(state.get("failed", 0)), int(state.get("draws", 0))
