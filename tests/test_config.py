"""The run configuration (utils/config.py): one declaration per setting, presets as complete values, files, the
command line and saved runs read into one RunConfig."""
import dataclasses
import json
import typing
from pathlib import Path

import pytest

import train
from utils.config import (DEFINES, FIELD_GROUP, GROUPS, IGNORED, POLICIES, RESUMABLE, ConfigError, RunConfig,
                          config_fields, config_from_checkpoint, make_config, read_config_file, resume_differences)
from utils.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
# The flat flag names a user's scripts call train.py with: each keeps working.
FLAGS_BEFORE = ("exp output_dir resume overwrite seed data_path dataset test_class datasetLen testall eval_per_class "
                "custom_split synthetic_dir image_size augment num_workers max_bad_fraction arch vit_weights "
                "clip_weights variant keep_ratio prompt vxl_norm clip_input_norm int_memory separate_encoders "
                "vxl_cache dropout stem_norm input_norm ln_eps tri_distance margin w_tri w_rec w_int w_cls w_inst "
                "epoch batch_size lr weight_decay warmup_steps device gpu amp compile compile_backend compile_mode "
                "eval_every eval_batch_size log_every on_collapse collapse_patience no_progress no_tb_images").split()


def parse(*argv) -> RunConfig:
    from utils.config import parse_config

    return parse_config(train.get_args_parser().parse_args([str(a) for a in argv]))


def test_every_setting_is_declared_once_with_one_resume_policy_and_a_help():
    names = [f.name for _, f in config_fields()]
    assert len(names) == len(set(names)), "flat flag names must be unique across the groups"
    for _, f in config_fields():
        assert f.metadata["policy"] in POLICIES, f.name
        assert f.metadata["help"].strip(), f.name
    policies = {f.name: f.metadata["policy"] for _, f in config_fields()}
    assert policies["batch_size"] == DEFINES and policies["lr"] == RESUMABLE and policies["exp"] == IGNORED
    assert set(GROUPS) == {"data", "model", "loss", "optim", "runtime"}


def test_every_flag_of_before_is_still_a_flag_and_the_help_shows_each_presets_value():
    parser = train.get_args_parser()
    options = {s.lstrip("-") for a in parser._actions for s in a.option_strings}
    assert set(FLAGS_BEFORE) <= options, set(FLAGS_BEFORE) - options
    text = " ".join(parser.format_help().split())
    assert "b16: 1e-05, tiny: 0.0005" in text  # --lr
    assert "b16: batch, tiny: batch" not in text and "b16: none, tiny: batch" in text  # --stem_norm
    assert "--config FILE" in text


def test_a_preset_is_a_complete_value():
    for name, preset in PRESETS.items():
        assert preset.model.arch == name
        for _, f in config_fields():
            hint = typing.get_type_hints(GROUPS[FIELD_GROUP[f.name]])[f.name]
            if type(None) not in typing.get_args(hint):
                assert preset.flat()[f.name] is not None, (name, f.name)


def test_the_card_command_and_the_derived_defaults():
    config = parse("--exp", "run", "--epoch", 3, "--batch_size", 4, "--num_workers", 0, "--gpu", "1")
    assert (config.runtime.exp, config.optim.epoch, config.optim.batch_size, config.data.num_workers,
            config.runtime.gpu) == ("run", 3, 4, 0, "1")
    assert config.model.arch == "tiny" and config.optim.lr == 5e-4  # no --data_path: the CPU preset
    b16 = parse("--data_path", "/data", "--dataset", "tu_berlin")
    assert (b16.model.arch, b16.data.test_class, b16.loss.tri_distance, b16.loss.margin) == (
        "b16", "test_class_tuberlin30", "euclidean", 1.0)
    assert b16.model.vit_weights == "vit_base_patch16_224.orig_in21k" and not b16.data.pseudo_sketch
    non_mask = parse("--data_path", "/data", "--variant", "non-mask")
    assert (non_mask.loss.tri_distance, non_mask.loss.margin) == ("cosine", 0.2)
    assert parse("--data_path", "/d", "--variant", "non-mask", "--tri_distance", "euclidean").loss.margin == 1.0
    assert parse("--w_inst", 0).data.pseudo_sketch is False and parse().data.pseudo_sketch is True
    assert parse("--vit_weights", "none", "--arch", "b16").model.vit_weights is None


def test_contradictions_are_refused_naming_the_flags():
    with pytest.raises(ConfigError, match="--w_inst 1.0 needs the pseudo-sketches"):
        parse("--no-pseudo_sketch")
    with pytest.raises(ConfigError, match="--no-testall needs --eval_per_class"):
        parse("--no-testall")
    with pytest.raises(ConfigError, match=r"--keep_ratio must be in \(0, 1\)"):
        parse("--keep_ratio", 1.5)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_config_file_grouped_or_flat_under_the_command_line(tmp_path):
    grouped = write(tmp_path / "r.yaml",
                    "model:\n  arch: b16\noptim:\n  lr: 1e-4\n  epoch: 7\ndata:\n  dataset: tu_berlin\n")
    config = parse("--config", grouped, "--epoch", 2)
    assert (config.model.arch, config.optim.lr, config.optim.epoch, config.data.test_class) == (
        "b16", 1e-4, 2, "test_class_tuberlin30")  # YAML's 1e-4 (a string to PyYAML) read as a float
    flat = write(tmp_path / "f.json", json.dumps({"arch": "tiny", "w_cls": 0}))
    assert parse("--config", flat).loss.w_cls == 0.0


@pytest.mark.parametrize("text, message", [
    ("optim: {lr: [1, 2]", "does not parse"),
    ("optim:\n  learning_rate: 0.1\n", "unknown key 'optim.learning_rate'"),
    ("loss:\n  lr: 0.1\n", "key 'loss.lr': lr belongs to the group 'optim'"),
    ("optim: 3\n", "'optim' is a group: a mapping of its settings"),
    ("runtime:\n  resume: true\n", "'runtime.resume' is an action of one command"),
    ("model:\n  keep_ratio: 1.5\n", r"--keep_ratio must be in \(0, 1\), got 1.5"),
    ("optim:\n  epoch: ten\n", "epoch must be int, got 'ten'"),
    ("model:\n  variant: half\n", r"variant must be one of \['puxim', 'non-mask'\], got 'half'"),
    ("- lr\n", "a configuration is a mapping of settings, got list"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_key_exit_2(tmp_path, caplog, text, message):
    bad = write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(bad), "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(bad) in errors[0]
    import re

    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_an_earlier_runs_args_json_is_a_config(tmp_path):
    from utils.experiment import write_args_json

    config = make_config("tiny", lr=3e-4, keep_ratio=0.5, exp="first", num_seen_classes=7)
    write_args_json(tmp_path, config.to_dict())
    again = parse("--config", tmp_path / "args.json", "--exp", "second")
    assert again.replace(exp="first") == config
    with pytest.raises(ConfigError):
        read_config_file(tmp_path / "missing.yaml")


def test_an_args_json_of_format1_is_a_config(tmp_path, micro_preset):
    """train.py's args.json before the typed configuration: {"args": vars(args)}, None for "the preset's"."""
    import torch

    saved = torch.load(REPO / "tests/fixtures/format1_micro.pth", map_location="cpu", weights_only=False)["args"]
    assert saved["dropout"] is None and saved["synthetic"] is True  # what format 1 wrote
    (tmp_path / "args.json").write_text(json.dumps({"args": saved, "environment": {}}))
    config = parse("--config", tmp_path / "args.json", "--exp", "again")
    assert config.replace(exp="format1") == config_from_checkpoint({"args": saved}).replace(exp="format1")
    assert (config.model.arch, config.model.dropout, config.optim.batch_size) == ("micro", 0.0, 16)
    # a run from before --w_cls / --augment: the file gives what it ran with, not today's tiny preset
    (tmp_path / "older.json").write_text(json.dumps({"args": {"arch": "tiny", "input_norm": None}}))
    older = parse("--config", tmp_path / "older.json")
    assert (older.loss.w_cls, older.loss.w_inst, older.data.augment, older.optim.warmup_steps) == (0.0, 0.0, "none", 0)
    assert older.model.input_norm == "photo" and older.data.pseudo_sketch is False  # None: the preset's


def test_every_recipe_file_parses_and_builds_its_model_and_criterion():
    import torch

    from losses import build_criterion
    from models import build_model

    files = sorted((REPO / "configs").rglob("*.yaml"))
    names = {p.relative_to(REPO / "configs").as_posix() for p in files}
    assert {"sketchy25.yaml", "sketchy21.yaml", "tuberlin.yaml", "quickdraw.yaml", "sketchy_am.yaml",
            "ablations/no_pmm_rec.yaml", "ablations/no_pmm_int.yaml", "ablations/non_mask.yaml",
            "ablations/unmasked_memory.yaml", "ablations/keep_ratio_0.1.yaml", "ablations/keep_ratio_0.5.yaml",
            "ablations/keep_ratio_0.7.yaml"} <= names
    built = {}
    for path in files:
        config = parse("--config", path, "--data_path", "/data", "--vit_weights", "none")
        assert config.model.arch == ("tiny" if "tiny" in path.name else "b16"), path
        model_key = (config.model.arch, config.model.variant, config.model.int_memory)
        if model_key not in built:  # one build per distinct model, on the meta device: shapes without the init
            with torch.device("meta"):
                built[model_key] = build_model(config, with_sampler=False)
        build_criterion(config)
    by_name = {p.name: parse("--config", p, "--data_path", "/d") for p in files}
    assert by_name["keep_ratio_0.1.yaml"].model.keep_ratio == 0.1
    assert by_name["no_pmm_rec.yaml"].loss.w_rec == 0.0 and by_name["no_pmm_int.yaml"].loss.w_int == 0.0
    assert by_name["non_mask.yaml"].loss.margin == 0.2 and built[("b16", "non-mask", "masked")].sampler is None
    assert by_name["quickdraw.yaml"].data.test_class == "test_class_quickdraw30"


def test_the_command_in_each_recipe_file_has_what_its_run_needs():
    """The train.py command a configs/ file's header shows runs as written: a b16 run with VxL masks and no mask
    cache names the CLIP its sampler needs (without --clip_weights train.py exits 2)."""
    import shlex

    from utils.presets import get_architecture

    for path in sorted((REPO / "configs").rglob("*.yaml")):
        header = "\n".join(line[1:] for line in path.read_text().splitlines() if line.startswith("#"))
        commands = [c for c in header.replace("\\\n", " ").splitlines() if c.strip().startswith("python train.py")]
        assert len(commands) == 1, path
        config = parse(*shlex.split(commands[0])[2:])
        needs_clip = (config.model.variant == "puxim" and not config.model.vxl_cache
                      and get_architecture(config.model.arch).sampler.random_clip is None)
        assert config.model.clip_weights or not needs_clip, f"{path}: {commands[0].strip()} lacks --clip_weights"


def test_the_resume_check_compares_what_defines_the_run():
    config = make_config("tiny")
    defining, resumable = resume_differences(config.replace(lr=1e-3, batch_size=16, exp="other"), config)
    assert [d[0] for d in defining] == ["batch_size"] and [r[0] for r in resumable] == ["lr"]


def test_a_format1_checkpoint_gives_the_configuration_it_ran_with(micro_preset):
    import torch

    ckpt = torch.load(REPO / "tests/fixtures/format1_micro.pth", map_location="cpu", weights_only=False)
    assert ckpt["format"] == 1 and "config" not in ckpt
    config = config_from_checkpoint(ckpt)
    # Saved as None (the preset's) or absent in format 1: the values that run had.
    assert (config.model.dropout, config.model.stem_norm, config.model.ln_eps, config.loss.margin) == (
        0.0, "batch", 1e-6, 0.2)
    assert (config.data.pseudo_sketch, config.model.num_seen_classes, config.optim.batch_size) == (True, 26, 16)
    assert config.model == dataclasses.replace(PRESETS["micro"].model, num_seen_classes=26)
    with pytest.raises(ConfigError, match="holds no configuration"):
        config_from_checkpoint({"model": {}})


# The modules a training run goes through: a setting's default stated in one of them would be a second copy of
# the configuration's (the tools keep flags of their own, with their own meanings).
TRAINING_PATH = ["train.py", "test.py", "engine.py", "models", "losses", "datasets/__init__.py",
                 "datasets/sampling.py", "datasets/loaders.py", "datasets/transforms.py", "datasets/robust.py",
                 "datasets/benchmarks.py", "utils"]


def _restated_defaults(tree, names: set, preset_values: dict) -> list:
    """Places in ``tree`` that state a setting's value as a default: a parameter named after a setting whose
    default is one of the presets' values for it, a ``getattr``-or-default of a setting, a flag's default."""
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
            pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in pairs:
                if (arg.arg in names and isinstance(default, ast.Constant)
                        and default.value in preset_values[arg.arg]):
                    found.append(f"line {node.lineno}: def {node.name}(..., {arg.arg}={default.value!r})")
        elif isinstance(node, ast.Call) and len(node.args) >= 3:
            key = node.args[1]
            if isinstance(key, ast.Constant) and key.value in names:  # getattr(args, "lr", 1e-5), _arg(...)
                found.append(f"line {node.lineno}: a default for {key.value!r}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
            flag = str(getattr(node.args[0], "value", "")).lstrip("-")
            if flag in names and any(k.arg == "default" and isinstance(k.value, ast.Constant)
                                     and k.value.value in preset_values[flag] for k in node.keywords):
                found.append(f"line {node.lineno}: --{flag}'s default")
    return found


def test_no_default_is_stated_outside_the_configuration():
    import ast

    names = set(FIELD_GROUP)
    preset_values = {name: {p.flat()[name] for p in PRESETS.values()} - {None} for name in names}
    files = [p for entry in TRAINING_PATH for p in ([REPO / entry] if entry.endswith(".py")
                                                     else sorted((REPO / entry).rglob("*.py")))]
    files = [p for p in files if p.name not in ("config.py", "presets.py")]
    assert len(files) > 20
    found = {p.relative_to(REPO).as_posix(): _restated_defaults(ast.parse(p.read_text()), names, preset_values)
             for p in files}
    assert not {k: v for k, v in found.items() if v}


def test_the_restated_default_check_finds_the_copies_it_is_for():
    import ast

    names, values = {"margin", "lr", "dropout"}, {"margin": {1.0, 0.2}, "lr": {1e-5}, "dropout": {0.1, 0.0}}
    source = ("def triplet(margin=1.0, other=3):\n    return getattr(args, 'lr', 1e-5)\n"
              "p.add_argument('--dropout', type=float, default=0.1)\n"
              "def fine(margin):\n    return margin\n")
    assert len(_restated_defaults(ast.parse(source), names, values)) == 3
