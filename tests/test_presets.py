"""utils.presets: each preset's architecture and complete run configuration, read by train.py, the models and the
tools."""
import dataclasses

import pytest

import train
from conftest import parse_train_args  # tests/ is on sys.path
from models import build_model
from models.vxl_sampler import CLIP_MODEL_NAME, TINY_CLIP_CFG, build_vxl_sampler
from utils.config import ConfigError, make_config
from utils.presets import ARCHITECTURES, PRESETS, get_architecture, get_preset


def test_the_presets_hold_the_papers_recipe_and_the_cpu_presets():
    """The values written out: a typo in utils/presets.py or in a setting's default changes a preset."""
    sizes = {name: (dataclasses.asdict(a.encoder), dataclasses.asdict(a.interaction)) for name, a in
             ARCHITECTURES.items()}
    assert sizes == {
        "b16": (dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                     stem_channels=(64, 128, 256)), dict(d_model=768, nhead=4, num_layers=4, dim_feedforward=1024)),
        "tiny": (dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
                      stem_channels=(16, 32, 64)), dict(d_model=192, nhead=4, num_layers=2, dim_feedforward=256)),
    }
    recipe = ("lr", "weight_decay", "batch_size", "epoch", "datasetLen", "image_size", "tri_distance", "margin",
              "w_tri", "w_rec", "w_int", "w_cls", "w_inst", "warmup_steps", "augment", "pseudo_sketch", "vit_weights",
              "dropout", "stem_norm", "ln_eps", "input_norm", "keep_ratio", "prompt", "vxl_norm", "clip_input_norm",
              "int_memory", "variant")
    values = {name: tuple(p.flat()[k] for k in recipe) for name, p in PRESETS.items()}
    assert values == {
        "b16": (1e-5, 1e-3, 2, 50, 5000, 224, "euclidean", 1.0, 1.0, 0.05, 0.1, 0.0, 0.0, 0, "none", False,
                "vit_base_patch16_224.orig_in21k", 0.1, "none", 1e-6, "none", 0.3, "{}", "token", "encoder",
                "masked", "puxim"),
        "tiny": (5e-4, 1e-4, 32, 10, 1600, 64, "cosine", 0.2, 1.0, 0.05, 0.1, 1.0, 1.0, 50, "crop_flip", True,
                 None, 0.0, "batch", 1e-6, "photo", 0.3, "{}", "token", "encoder", "masked", "puxim"),
    }
    assert CLIP_MODEL_NAME == "ViT-B-16-quickgelu" == ARCHITECTURES["b16"].sampler.clip_model
    assert ARCHITECTURES["b16"].sampler.random_clip is None and ARCHITECTURES["b16"].sampler.surgery_depth == 6
    assert TINY_CLIP_CFG == dict(
        embed_dim=64, quick_gelu=True,
        vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=4, head_width=64, mlp_ratio=4.0),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    assert ARCHITECTURES["tiny"].sampler.surgery_depth == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].optim.lr = 1.0


def test_a_presets_sampler_settings_reach_the_model_the_cache_key_and_the_help(monkeypatch):
    from models.vxl_cache import expected_cache_key

    other = PRESETS["tiny"].replace(arch="tiny_other", keep_ratio=0.5, prompt="a sketch of {}", vxl_norm="channel")
    monkeypatch.setitem(PRESETS, "tiny_other", other)
    monkeypatch.setitem(ARCHITECTURES, "tiny_other", ARCHITECTURES["tiny"])
    config = parse_train_args(["--arch", "tiny_other"])
    model = config.model
    assert (model.keep_ratio, model.prompt, model.vxl_norm, model.clip_input_norm) == (
        0.5, "a sketch of {}", "channel", "encoder")
    sampler = build_model(config).sampler
    assert (sampler.keep_ratio, sampler.prompt, sampler.feature_norm) == (0.5, "a sketch of {}", "channel")
    key = expected_cache_key(config)
    assert (key["keep_ratio"], key["prompt"], key["feature_norm"]) == (0.5, "a sketch of {}", "channel")
    flagged = parse_train_args(["--arch", "tiny_other", "--keep_ratio", "0.2"])
    assert flagged.model.keep_ratio == 0.2 and flagged.model.prompt == "a sketch of {}"
    assert "tiny_other: 0.5" in " ".join(train.get_args_parser().format_help().split())


def test_train_takes_every_setting_from_the_preset_and_shows_every_default():
    b16, tiny = parse_train_args(["--data_path", "/data"]), parse_train_args([])
    assert b16 == PRESETS["b16"].replace(data_path="/data") and tiny == PRESETS["tiny"]
    assert parse_train_args(["--data_path", "/data", "--vit_weights", "none"]).model.vit_weights is None
    text = " ".join(train.get_args_parser().format_help().split())  # argparse wraps lines
    for shown in ("b16: 1e-05, tiny: 0.0005", "b16: 0.001, tiny: 0.0001", "b16: 50, tiny: 10", "b16: 2, tiny: 32",
                  "b16: 5000, tiny: 1600", "b16: 224, tiny: 64", "b16: euclidean, tiny: cosine",
                  "b16: 0.0, tiny: 1.0", "b16: vit_base_patch16_224.orig_in21k, tiny: None", "{b16,tiny}"):
        assert shown in text, shown


def test_a_new_preset_is_one_entry_in_each_table(monkeypatch):
    """Registering a preset is enough: train.py's --arch takes it with its recipe; the models build it."""
    tiny = ARCHITECTURES["tiny"]
    micro = dataclasses.replace(tiny, name="micro", encoder=dataclasses.replace(tiny.encoder, depth=2))
    monkeypatch.setitem(ARCHITECTURES, "micro", micro)
    monkeypatch.setitem(PRESETS, "micro", PRESETS["tiny"].replace(arch="micro", lr=1e-3, epoch=3, batch_size=8))

    parser = train.get_args_parser()  # after the patch: --arch's choices are read when the parser is built
    assert "micro: 0.001" in " ".join(parser.format_help().split())
    config = parse_train_args(["--exp", "micro_run", "--arch", "micro"])
    assert (config.optim.lr, config.optim.epoch, config.optim.batch_size, config.optim.weight_decay,
            config.data.datasetLen, config.data.image_size) == (1e-3, 3, 8, 1e-4, 1600, 64)
    assert (config.loss.tri_distance, config.loss.w_cls, config.model.vit_weights) == ("cosine", 1.0, None)

    model = build_model(config, with_sampler=False)
    assert len(model.encoder.vit.blocks) == 2
    assert model.interaction.decoder.num_layers == tiny.interaction.num_layers
    assert build_vxl_sampler("micro").surgery_depth == tiny.sampler.surgery_depth  # its random CLIP


def test_an_unknown_preset_names_the_known_ones(capsys):
    with pytest.raises(ValueError, match=r"unknown preset \(--arch\) 'huge'; choose one of \['b16', 'tiny'\]"):
        get_preset("huge")
    with pytest.raises(ValueError, match=r"'huge'.*\['b16', 'tiny'\]"):
        get_architecture("huge")
    with pytest.raises(ConfigError, match=r"arch must be one of \['b16', 'tiny'\], got 'huge'"):
        make_config("huge")
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--arch", "huge"])
    assert "invalid choice: 'huge' (choose from" in capsys.readouterr().err


def test_visualize_masks_takes_train_py_default_arch():
    from tools import visualize_masks

    def arch(*argv):
        return visualize_masks.resolve_settings(visualize_masks.get_args_parser().parse_args(list(argv))).model.arch

    assert arch() == parse_train_args([]).model.arch == "tiny"
    assert arch("--data_path", "/data") == parse_train_args(["--data_path", "/data"]).model.arch == "b16"
    assert arch("--clip_weights", "ViT-B-16.pt") == "b16"  # its own photos with OpenAI's CLIP (module doc)
    assert arch("--arch", "tiny", "--data_path", "/data") == "tiny"


def test_instance_loss_flag_is_resolved_and_checked():
    assert parse_train_args([]).loss.w_inst == PRESETS["tiny"].loss.w_inst == 1.0
    assert parse_train_args(["--data_path", "/data"]).loss.w_inst == 0.0  # b16: the paper's loss
    assert parse_train_args(["--w_inst", "0.5"]).loss.w_inst == 0.5
    with pytest.raises(ConfigError, match="--w_inst must be >= 0"):
        parse_train_args(["--w_inst", "-1"])
