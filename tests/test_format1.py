"""Checkpoints of format 1 (flat ``args``, written before the typed configuration) still load: the model rebuilds to
the same numbers, test.py evaluates one, the tools open one, and --resume continues one.

tests/fixtures/format1_micro.pth was written by train.py of format 1 (tests/fixtures/make_format1_checkpoint.py);
format1_micro_embeddings.pt holds what that code's model gave on fixed images.
"""
import shutil
from pathlib import Path

import pytest
import torch

import test as test_py
import train
from models import build_model
from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_model_weights, save_checkpoint
from utils.config import config_from_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMAT1 = FIXTURES / "format1_micro.pth"


def test_the_fixture_is_format1_and_the_model_rebuilds_to_the_same_embeddings(micro_preset):
    ckpt = load_checkpoint(FORMAT1)
    assert ckpt["format"] == 1 and "args" in ckpt and "config" not in ckpt and CHECKPOINT_FORMAT == 2
    config = config_from_checkpoint(ckpt)
    assert (config.model.arch, config.model.stem_norm, config.model.input_norm, config.model.num_seen_classes) == (
        "micro", "batch", "photo", 26)
    model = build_model(config.replace(vit_weights=None), with_sampler=False).eval()
    load_model_weights(model, ckpt["model"], source=str(FORMAT1))
    expected = torch.load(FIXTURES / "format1_micro_embeddings.pt", map_location="cpu")
    with torch.no_grad():
        for modality in ("sketch", "photo"):
            torch.testing.assert_close(model.encode(expected["images"], modality), expected[modality],
                                       rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def seen26(make_benchmark):
    """A drawn benchmark with the fixture's 26 seen classes (its class head's size) and 8 unseen ones."""
    return make_benchmark(seen=26, unseen=8, per_class=2, size=64)


def on_benchmark(root: Path, dest: Path) -> Path:
    """The fixture, its data path moved to ``root`` (it was trained on the synthetic benchmark's cache)."""
    ckpt = load_checkpoint(FORMAT1)
    ckpt["args"].update(data_path=str(root), custom_split=True)
    return save_checkpoint(ckpt, dest)


def test_test_py_and_the_tools_open_a_format1_checkpoint(micro_preset, seen26, tmp_path):
    ckpt = on_benchmark(seen26, tmp_path / "format1.pth")
    report = test_py.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "eval"), "--no_progress",
                           "--num_workers", "0", "--device", "cpu"])
    metrics = report["metrics"]
    assert report["arch"] == "micro" and metrics["num_queries"] == metrics["num_gallery"] == 16
    assert metrics["chance_mAP"] == pytest.approx(1 / 8) and 0.5 * metrics["chance_mAP"] < metrics["mAP@all"]

    from tools.search import build_from_checkpoint, open_checkpoint

    opened = open_checkpoint(str(ckpt))
    model = build_from_checkpoint(opened, str(ckpt), torch.device("cpu"))
    assert model.encoder.embed_dim == 32 and model.class_head.weight.shape == (26, 32)


def test_resume_continues_a_format1_checkpoint_and_saves_format2(micro_preset, seen26, tmp_path):
    run_dir = tmp_path / "results" / "format1"
    run_dir.mkdir(parents=True)
    on_benchmark(seen26, run_dir / "checkpoint.pth")
    result = train.main(["--exp", "format1", "--output_dir", str(tmp_path / "results"), "--resume", "--arch", "micro",
                         "--data_path", str(seen26), "--custom_split", "--epoch", "2", "--datasetLen", "32",
                         "--batch_size", "16", "--eval_per_class", "2", "--num_workers", "0", "--no_progress",
                         "--no_tb_images", "--device", "cpu"])
    assert result["global_step"] == 4  # the fixture's 2 steps, then epoch 1's 2
    saved = load_checkpoint(run_dir / "checkpoint.pth")
    assert saved["format"] == 2 and saved["next_epoch"] == 2 and saved["config"]["model"]["arch"] == "micro"
    shutil.rmtree(tmp_path / "results")
