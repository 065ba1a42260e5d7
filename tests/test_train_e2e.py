"""train.py and test.py end to end (tiny preset, CPU).

The session's one learning run (conftest.py's ``learned_run``: the tiny preset's defaults on a family cell, with
its learning bars) must lower the loss and lift the unseen-class mAP above chance; its folder
must hold everything the README promises; test.py must rebuild the model from the checkpoint alone. On the shared
synthetic benchmark (conftest.py's ``bench``), one short epoch is where a resumed run continues from (exactly) and
what a compiled run must equal.
"""

import json
import shutil

import pytest
import torch

import test as test_script
import train
from conftest import LEARN_SCHEDULE, train_args  # tests/ is on sys.path
from utils.health import alarm_in

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TB_IMAGES = {"no_tb_images": False}  # these runs log TensorBoard pictures too (train.py's log_pictures)


@pytest.fixture(scope="module")
def trained(learned_run):
    """The session's learning run (it logs the TensorBoard pictures too): its experiment folder and train.main's
    result. Read it, never change it (test.py writes into a copy)."""
    return learned_run.folder, learned_run.result


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


def test_tiny_preset_learns_a_family_cell(learned_run):
    """A brief run of the tiny preset's defaults on a family cell it was not tuned on learns, not collapses.

    The run is the session's ``learned_run`` (conftest.py): 8 seen / 4 unseen single-shape classes, 30 images each,
    flat and noisy photos; 175 updates of 16 triplets in epochs of 25, so the last epoch's training figures are
    those of steps 151-175. Collapse sits at triplet accuracy 0.5 and embedding spread near 0; with the paper's loss
    alone (``--tri_distance euclidean --w_cls 0 --w_inst 0 --warmup_steps 0 --augment none``) this run collapses
    and all three bars fail.
    """
    last = learned_run.log[-1]
    assert last["step"] == 175 and last["test_chance_mAP"] == pytest.approx(0.25)
    assert last["train_triplet_acc"] >= 0.6, last
    assert last["train_emb_spread"] >= 0.3, last
    assert last["test_mAP@all"] >= 1.2 * last["test_chance_mAP"], last
    assert learned_run.result["final"]["mAP@all"] == pytest.approx(last["test_mAP@all"])


def test_training_lowers_loss_and_stays_above_chance(trained):
    # The loop on a brief run (the learning bars themselves: test_tiny_preset_learns_a_family_cell). The learning bar
    # of `make run` (>= 2x chance after the full schedule, ~500 steps of 32) is printed by `make run`, not re-run.
    folder, result = trained
    lines = read_log(folder)
    epochs = LEARN_SCHEDULE["epoch"]
    assert [l["epoch"] for l in lines] == list(range(epochs))
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    final = result["final"]
    assert final["chance_mAP"] == pytest.approx(1 / 4)  # 4 unseen classes, 30 photos each
    assert final["mAP@all"] >= 1.1 * final["chance_mAP"], final
    assert result["global_step"] == epochs * LEARN_SCHEDULE["datasetLen"] // LEARN_SCHEDULE["batch_size"]
    # A run that learns raises no collapse alarm (health figures every 10 steps, the default 100-step patience:
    # from scratch the cosine triplet loss sits at its margin for the first steps while the class and instance
    # losses move the encoder), and logs its health figures (test_health.py forces a collapse and checks the
    # alarm): above what a collapse gives (triplet accuracy 0.5, spread near 0).
    assert alarm_in((folder / "train.log").read_text()) is None  # neither COLLAPSED nor NOT LEARNING
    assert lines[-1]["train_triplet_acc"] > 0.5 and lines[-1]["train_emb_spread"] > 0.02, lines[-1]


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


def test_existing_experiment_is_not_overwritten(trained, learned_run):
    folder, _ = trained
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(learned_run.root, folder.parent, folder.name, **TB_IMAGES))
    assert exc.value.code == 2
    assert (folder / "checkpoint.pth").is_file()


def test_test_script_rebuilds_model_from_checkpoint(trained, tmp_path):
    shared, result = trained
    folder = tmp_path / shared.name  # test.py writes its results into the experiment folder: a copy of it
    shutil.copytree(shared, folder)
    report = test_script.main(["--exp", folder.name, "--output_dir", str(tmp_path), "--num_workers", "0",
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


# One epoch of 2 steps of 4 triplets on the shared benchmark (3 seen + 2 unseen classes), evaluated on its 8
# unseen sketches and 8 photos (--eval_per_class 4: all of them, the split test.py evaluates).
SHORT = ["--datasetLen", "8", "--batch_size", "4", "--seed", "3", "--eval_per_class", "4"]


@pytest.fixture(scope="module")
def one_epoch(bench, tmp_path_factory):
    """One epoch of :data:`SHORT`: the interrupted run test_resume_continues_exactly resumes (a copy of it), the
    eager run the compiled one must equal. Read it, never change it."""
    out = tmp_path_factory.mktemp("one_epoch")
    result = train.main(train_args(bench, out, "part", "--epoch", "1", *SHORT, **TB_IMAGES))
    return {"folder": out / "part", "result": result}


def test_resume_continues_exactly(bench, one_epoch, tmp_path):
    full = train.main(train_args(bench, tmp_path, "full", "--epoch", "2", *SHORT, **TB_IMAGES))
    shutil.copytree(one_epoch["folder"], tmp_path / "part")  # the 1-epoch run, stopped after its epoch
    resumed = train.main(train_args(bench, tmp_path, "part", "--epoch", "2", "--resume", *SHORT, **TB_IMAGES))
    assert one_epoch["result"]["global_step"] == 2
    assert resumed["global_step"] == full["global_step"] == 2 * 2
    assert [l["epoch"] for l in read_log(tmp_path / "part")] == [0, 1]
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # the resumed epoch evaluates as the uninterrupted one
    assert resumed["final"]["mAP@all"] == pytest.approx(full["final"]["mAP@all"], abs=1e-4)


def test_compile_flag_trains_and_saves_uncompiled_weights(bench, one_epoch, tmp_path):
    # backend "eager": dynamo traces the encoder and the decoder without a C++ build (fast on CPU).
    result = train.main(train_args(bench, tmp_path, "compiled", "--epoch", "1", "--compile", "--compile_backend",
                                   "eager", *SHORT, "--no_tb_images"))
    plain = one_epoch["result"]
    assert result["global_step"] == plain["global_step"] == 2
    a = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(one_epoch["folder"] / "checkpoint.pth", weights_only=True)["model"]
    assert list(a) == list(b) and not any("_orig_mod" in k for k in a)  # loadable without compiling
    for k in a:  # same seed, same steps: the same weights
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # ... the same evaluation, and test.py (an eager model rebuilt from the checkpoint) gives it again
    assert result["final"]["mAP@all"] == pytest.approx(plain["final"]["mAP@all"], abs=1e-4)
    report = test_script.main(["--exp", "compiled", "--output_dir", str(tmp_path), "--num_workers", "0",
                               "--device", "cpu", "--no_progress"])
    assert report["metrics"]["mAP@all"] == pytest.approx(result["final"]["mAP@all"], abs=1e-4)
