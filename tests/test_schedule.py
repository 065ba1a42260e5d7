"""train.py's b16 defaults are the released recipe; the number of optimizer updates a run makes; --ln_eps."""
import pytest
import torch
from torch.utils.data import DataLoader

import engine
from conftest import parse_train_args  # tests/ is on sys.path
from datasets.sampling import TripletIndexSampler
from utils.config import DEFINES, RESUMABLE, ConfigError, config_fields
from utils.schedule import planned_updates, schedule_warning
from utils.train_state import check_resume_config

POLICY = {f.name: f.metadata["policy"] for _, f in config_fields()}


def resume_check(argv, saved: dict, tmp_path):
    """train.py --resume's check of ``argv`` against a format-1 checkpoint whose flags were ``saved``."""
    check_resume_config(parse_train_args(argv), {"args": saved}, tmp_path / "checkpoint.pth")


def test_b16_defaults_are_the_released_recipe():
    config = parse_train_args(["--data_path", "/data"])  # a dataset: the b16 preset
    optim = config.optim
    assert config.model.arch == "b16"
    assert (optim.batch_size, optim.lr, optim.weight_decay, optim.epoch, config.data.datasetLen) == (
        2, 1e-5, 1e-3, 50, 5000)
    assert config.model.ln_eps == 1e-6  # timm's
    assert planned_updates(config.data.datasetLen, optim.batch_size, optim.epoch) == 125_000
    assert schedule_warning(config, 125_000) is None
    assert parse_train_args(["--data_path", "/data", "--batch_size", "16"]).optim.batch_size == 16  # still available


@pytest.mark.parametrize("triplets,batch,epochs,world,expected", [
    (5000, 2, 50, 1, 50 * 2500),  # the released schedule: 125,000
    (5000, 16, 50, 1, 50 * 313),  # 5000 / 16 = 312.5: the last batch of each epoch has 8 triplets
    (5000, 2, 50, 2, 50 * 2500),  # 2 processes of batch 1, 2,500 triplets each
    (5000, 16, 50, 2, 50 * 313),  # 2 x 2,500 triplets in batches of 8
    (5000, 6, 10, 3, 10 * 833),  # 3 x 1,666 triplets (2 dropped per epoch) in batches of 2
    (1600, 32, 10, 1, 10 * 50),  # the tiny preset
])
def test_planned_updates_match_the_training_loader(triplets, batch, epochs, world, expected):
    assert planned_updates(triplets, batch, epochs, world) == expected
    for rank in range(world):  # what build_loaders builds: every rank makes the same number of steps
        sampler = TripletIndexSampler(triplets, rank=rank, world_size=world)
        loader = DataLoader(range(triplets * epochs), batch_size=batch // world, sampler=sampler, drop_last=False)
        assert epochs * len(loader) == expected


def test_a_larger_batch_warns_that_the_schedule_is_not_the_released_one():
    config = parse_train_args(["--data_path", "/data", "--batch_size", "16"])
    updates = planned_updates(config.data.datasetLen, config.optim.batch_size, config.optim.epoch)
    message = schedule_warning(config, updates)
    assert "makes 15,650 optimizer updates against the released 125,000 (batch 2 x 5,000 triplets x 50 epochs)" \
        in message
    assert "about 7.99 times less far" in message and "has not been validated" in message
    assert message.endswith("--batch_size 2 restores it.")
    longer = parse_train_args(["--data_path", "/data", "--epoch", "100"])
    assert "about 2 times further" in schedule_warning(longer, 250_000)
    assert schedule_warning(longer, 250_000).endswith("--epoch 50 restores it.")
    tiny = parse_train_args(["--batch_size", "16"])  # no --data_path: the tiny preset, which has no released schedule
    assert tiny.model.arch == "tiny" and schedule_warning(tiny, 1000) is None


def test_ln_eps_flag():
    assert parse_train_args(["--data_path", "/data", "--ln_eps", "1e-5"]).model.ln_eps == 1e-5
    with pytest.raises(ConfigError, match="--ln_eps must be positive"):
        parse_train_args(["--ln_eps", "0"])
    assert POLICY["ln_eps"] == DEFINES


def test_resume_treats_a_checkpoint_without_ln_eps_as_the_default(tmp_path, caplog):
    old = {"arch": "b16", "batch_size": 2, "seed": 0, "data_path": "/data"}  # saved before --ln_eps existed
    for ours in (None, 1e-6):
        resume_check(["--data_path", "/data", *(["--ln_eps", str(ours)] if ours else [])], dict(old), tmp_path)
    with pytest.raises(ConfigError, match=r"--ln_eps 1e-05 \(the run has 1e-06\)"):
        resume_check(["--data_path", "/data", "--ln_eps", "1e-5"], dict(old), tmp_path)
    with pytest.raises(ConfigError, match=r"--ln_eps 1e-06 \(the run has 1e-05\)"):
        resume_check(["--data_path", "/data"], dict(old, ln_eps=1e-5), tmp_path)
    resume_check(["--data_path", "/data", "--ln_eps", "1e-5"], dict(old, ln_eps=1e-5), tmp_path)


def test_linear_warmup_rates():
    lr_at = engine.linear_warmup(5e-4, 50)
    assert [lr_at(s) for s in (1, 25, 50, 51, 500)] == pytest.approx([1e-5, 2.5e-4, 5e-4, 5e-4, 5e-4], rel=1e-12)
    assert engine.linear_warmup(1e-5, 0)(1) == 1e-5  # b16: the released constant rate
    with pytest.raises(ValueError):
        engine.linear_warmup(1e-3, -1)


def test_train_one_epoch_sets_the_rate_of_each_step_from_the_run_step():
    """The rate of each step is lr_at(global step), also when the optimizer holds another rate (a resumed run's
    checkpoint with a changed --lr): SGD without momentum shows the rate in each update."""
    class Weight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            seen.append(float(self.weight.detach()))
            return {"w": self.weight * 1.0}

    class Sum(torch.nn.Module):
        def forward(self, outputs):
            return {"loss": outputs["w"].sum()}  # gradient 1: each step moves the weight by -lr

    seen, model = [], Weight()
    weight, criterion = model.weight, Sum()
    optimizer = torch.optim.SGD([weight], lr=123.0)

    batches = [{"sketch": torch.zeros(2, 1)} for _ in range(4)]
    loop = engine.TrainLoop(model, criterion, optimizer, torch.device("cpu"), progress=False,
                            lr_at=engine.linear_warmup(0.4, 4))
    engine.train_one_epoch(loop, batches, epoch=0, global_step=1)
    steps = [b - a for a, b in zip(seen, seen[1:] + [float(weight.detach())])]
    assert steps == pytest.approx([-0.2, -0.3, -0.4, -0.4])  # steps 2, 3, 4, 5 of the run
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)


def test_warmup_and_augment_flags():
    config = parse_train_args([])  # the synthetic benchmark: the tiny preset
    assert (config.optim.warmup_steps, config.data.augment) == (50, "crop_flip")
    config = parse_train_args(["--data_path", "/data"])  # b16: the released recipe
    assert (config.optim.warmup_steps, config.data.augment) == (0, "none")
    with pytest.raises(ConfigError, match="--warmup_steps must be >= 0"):
        parse_train_args(["--warmup_steps", "-1"])
    with pytest.raises(ConfigError, match="--augment none"):
        parse_train_args(["--vxl_cache", "/masks", "--augment", "crop_flip"])
    assert POLICY["augment"] == DEFINES and POLICY["warmup_steps"] == RESUMABLE


def test_resume_treats_a_checkpoint_without_augment_as_unaugmented(tmp_path):
    # saved before --augment existed (and after --tri_distance, --w_cls and --w_inst did)
    old = {"arch": "tiny", "batch_size": 32, "seed": 0, "tri_distance": "cosine", "w_cls": 1.0, "w_inst": 1.0}
    before_input_norm = ["--input_norm", "none"]  # nor --input_norm
    resume_check(["--augment", "none", *before_input_norm], dict(old), tmp_path)
    with pytest.raises(ConfigError, match=r"--augment 'crop_flip' \(the run has 'none'\)"):
        resume_check(before_input_norm, dict(old), tmp_path)


def test_input_norm_flag_resolves_to_the_preset_and_defines_the_run(tmp_path):
    """--input_norm: tiny's photo, b16's none, written into the configuration (so checkpoints name it); a resumed
    run keeps it."""
    assert parse_train_args([]).model.input_norm == "photo"  # no --data_path: tiny
    assert parse_train_args(["--data_path", "/data"]).model.input_norm == "none"  # b16, the paper's
    assert parse_train_args(["--input_norm", "none"]).model.input_norm == "none"
    with pytest.raises(SystemExit):
        parse_train_args(["--input_norm", "sketch"])
    assert POLICY["input_norm"] == DEFINES
    old = {"arch": "tiny", "batch_size": 32, "seed": 0, "tri_distance": "cosine", "w_cls": 1.0, "w_inst": 1.0,
           "augment": "crop_flip"}  # a tiny checkpoint saved before --input_norm: trained on photos as they are
    with pytest.raises(ConfigError, match=r"--input_norm 'photo' \(the run has 'none'\)"):
        resume_check([], dict(old), tmp_path)
    resume_check(["--input_norm", "none"], dict(old), tmp_path)
    resume_check([], dict(old, input_norm="photo"), tmp_path)
