"""train.py and test.py end to end on a small synthetic benchmark (tiny preset, CPU).

One short training run is shared by the tests of this module: it must lower the loss and lift the
unseen-class mAP above chance; its folder must hold everything the README promises; test.py must
rebuild the model from the checkpoint alone; a resumed run must continue exactly.
"""

import json
import math

import pytest
import torch

import test as test_script
import train
from conftest import train_args  # tests/ is on sys.path
from utils.health import alarm_in

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def synthetic_root(make_benchmark):
    """Every class of datasets.synthetic: 8 sketches and 8 photos per seen class, 16 of each per unseen class."""
    return make_benchmark(seen=None, unseen=None, per_class=8, unseen_per_class=16, size=64)


TB_IMAGES = {"no_tb_images": False}  # these runs log TensorBoard pictures too (train.py's log_pictures)


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("results")
    result = train.main(train_args(synthetic_root, out, "run", "--epoch", "3", "--datasetLen", "192", "--batch_size",
                                   "16", "--seed", "1", "--collapse_patience", "24", "--log_every", "3", **TB_IMAGES))
    return out / "run", result


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


def test_training_lowers_loss_and_stays_above_chance(trained):
    # The loop on a 36-step run. The learning bar itself (>= 2x chance after the full `make run`
    # schedule, ~500 steps) takes ~11 CPU minutes and is printed by `make run`, not re-run here.
    folder, result = trained
    lines = read_log(folder)
    assert [l["epoch"] for l in lines] == [0, 1, 2]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    final = result["final"]
    assert final["chance_mAP"] == pytest.approx(1 / 8)  # 8 unseen classes, 16 photos each
    assert final["mAP@all"] > final["chance_mAP"], final
    assert result["global_step"] == 3 * math.ceil(192 / 16)
    # A run that beats chance raises no collapse alarm (checked every 3 steps, 24-step patience: from scratch
    # the cosine triplet loss sits at its margin for the first ~12 steps while the class and instance losses
    # move the encoder), and logs its health figures (test_health.py forces a collapse and checks the alarm).
    assert alarm_in((folder / "train.log").read_text()) is None  # neither COLLAPSED nor NOT LEARNING
    assert 0 <= lines[-1]["train_triplet_acc"] <= 1 and lines[-1]["train_emb_spread"] > 0.02, lines[-1]


def test_experiment_folder_contents(trained):
    folder, _ = trained
    for name in ("args.json", "log.txt", "train.log", "checkpoint.pth", "best.pth"):
        assert (folder / name).is_file(), name
    assert list((folder / "tb").glob("events.out.tfevents.*"))
    meta = json.loads((folder / "args.json").read_text())
    from utils.presets import PRESETS

    assert meta["config"]["model"]["arch"] == "tiny" and meta["config"]["optim"]["lr"] == PRESETS["tiny"].optim.lr
    assert "torch" in meta["environment"] and "git_commit" in meta["environment"]
    assert not (folder / ".lock").exists(), "the run lock must be released"
    line = read_log(folder)[-1]
    for key in ("train_loss_tri", "train_loss_rec", "train_loss_int", "train_samples_per_s",
                "test_mAP@all", "test_mAP@200", "test_P@100", "test_P@200"):
        assert key in line, key


def test_existing_experiment_is_not_overwritten(trained, synthetic_root):
    folder, _ = trained
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(synthetic_root, folder.parent, "run", **TB_IMAGES))
    assert exc.value.code == 2
    assert (folder / "checkpoint.pth").is_file()


def test_test_script_rebuilds_model_from_checkpoint(trained, tmp_path):
    folder, result = trained
    report = test_script.main(["--exp", "run", "--output_dir", str(folder.parent), "--num_workers", "0",
                               "--device", "cpu", "--no_progress", "--save_features"])
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["metrics"]["mAP@all"] == pytest.approx(result["best"]["mAP@all"], abs=1e-6)
    assert report["metrics"]["mAP@all"] == saved["metrics"]["mAP@all"]  # what main returns is what it wrote
    for key in ("mAP@all", "mAP@200", "P@100", "P@200", "mAP@200_sake"):
        assert key in saved["metrics"]
    assert saved["num_queries"] > 0 and saved["num_gallery"] > 0 and saved["precision"] == "fp32"
    assert "mAP@200" in saved["conventions"]["keys"]
    rows = (folder / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("class,mAP@all") and len(rows) == 1 + len(saved["split"]["unseen_classes"])
    feats = __import__("numpy").load(folder / "features.npz")
    assert feats["query"].shape[0] == saved["num_queries"]


def test_resume_continues_exactly(synthetic_root, tmp_path):
    args = ["--datasetLen", "64", "--batch_size", "16", "--seed", "3", "--eval_per_class", "2", "--no-testall"]
    full = train.main(train_args(synthetic_root, tmp_path, "full", "--epoch", "2", *args, **TB_IMAGES))
    train.main(train_args(synthetic_root, tmp_path, "part", "--epoch", "1", *args, **TB_IMAGES))
    resumed = train.main(train_args(synthetic_root, tmp_path, "part", "--epoch", "2", "--resume", *args, **TB_IMAGES))
    assert resumed["global_step"] == full["global_step"] == 2 * 4
    assert [l["epoch"] for l in read_log(tmp_path / "part")] == [0, 1]
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compile_flag_trains_and_saves_uncompiled_weights(synthetic_root, tmp_path):
    # backend "eager": dynamo traces the encoder and the decoder without a C++ build (fast on CPU).
    args = ["--datasetLen", "32", "--batch_size", "16", "--epoch", "1", "--eval_per_class", "2", "--no-testall",
            "--no_tb_images", "--seed", "2"]
    result = train.main(train_args(synthetic_root, tmp_path, "compiled", "--compile", "--compile_backend", "eager",
                                   *args, **TB_IMAGES))
    plain = train.main(train_args(synthetic_root, tmp_path, "plain", *args, **TB_IMAGES))
    assert result["global_step"] == plain["global_step"] == 2
    a = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "checkpoint.pth", weights_only=True)["model"]
    assert list(a) == list(b) and not any("_orig_mod" in k for k in a)  # loadable without compiling
    for k in a:  # same seed, same steps: the same weights
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    report = test_script.main(["--exp", "compiled", "--output_dir", str(tmp_path), "--num_workers", "0",
                               "--device", "cpu", "--no_progress"])
    assert report["metrics"]["mAP@all"] > 0
