"""Errors reach the user as their message: a DataLoader worker's re-raised traceback is stripped."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.transforms import ImageLoadError
from utils.errors import user_message


class Unreadable(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise ImageLoadError(f"/data/sketch_{i}.png: cannot read the image (zero-byte file)\nremove it from the list")


def test_worker_error_keeps_only_the_original_message():
    with pytest.raises(ImageLoadError) as info:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what torch re-raises ...
    assert user_message(info.value) == ("/data/sketch_0.png: cannot read the image (zero-byte file)\n"
                                        "remove it from the list")  # ... and what the user reads


def test_plain_errors_are_unchanged():
    assert user_message(ValueError("bad --exp")) == "bad --exp"
    assert user_message(RuntimeError("Original Traceback (most recent call last):\nno name line")) \
        == "Original Traceback (most recent call last):\nno name line"


def test_evaluation_with_every_query_unreadable_names_a_file():
    """engine.evaluate: all queries unreadable -> DatasetError naming one, not a shape error from the metrics."""
    import engine
    from datasets.filelist import DatasetError

    class Model(torch.nn.Module):
        def encode(self, images, modality):
            return images.flatten(1)[:, :4]

    def loader(ok):
        n = len(ok)
        return [{"image": torch.rand(n, 3, 2, 2), "label": torch.zeros(n, dtype=torch.long),
                 "index": torch.arange(n), "ok": torch.tensor(ok), "path": [f"/q/{i}.png" for i in range(n)],
                 "errors": [f"/q/{i}.png: truncated" for i in range(n)]}]

    with pytest.raises(DatasetError, match=r"none of the 2 unseen-class queries could be read, e\.g\. /q/0\.png"):
        engine.evaluate(Model(), loader([False, False]), loader([True, True]), device=torch.device("cpu"),
                        progress=False)
