"""utils.presets: one typed configuration per preset, read by train.py, the models and the tools."""
import dataclasses
from types import SimpleNamespace

import pytest

import losses
import train
from conftest import parse_train_args  # tests/ is on sys.path
from models import INTERACTION_PRESETS, build_model
from models.encoder import ENCODER_PRESETS
from models.vxl_sampler import CLIP_MODEL_NAME, TINY_CLIP_CFG, build_vxl_sampler
from utils.presets import PRESETS, default_arch, get_preset


def test_the_presets_hold_the_values_the_tables_had():
    """The values of the four tables PRESETS replaced, written out: a typo in PRESETS changes a preset."""
    assert ENCODER_PRESETS == {
        "b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, dropout=0.1,
                    stem_channels=(64, 128, 256), stem_norm="none", ln_eps=1e-6, input_norm="none"),
        "tiny": dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0, dropout=0.0,
                     stem_channels=(16, 32, 64), stem_norm="batch", ln_eps=1e-6, input_norm="photo"),
    }
    assert INTERACTION_PRESETS == {
        "b16": dict(d_model=768, nhead=4, num_layers=4, dim_feedforward=1024, dropout=0.1),
        "tiny": dict(d_model=192, nhead=4, num_layers=2, dim_feedforward=256, dropout=0.0),
    }
    assert train.ARCH_DEFAULTS == {
        "b16": dict(lr=1e-5, weight_decay=1e-3, batch_size=2, epoch=50, datasetLen=5000, image_size=224,
                    tri_distance=None, w_cls=0.0, w_inst=0.0, warmup_steps=0, augment="none",
                    vit_weights="vit_base_patch16_224.orig_in21k"),
        "tiny": dict(lr=5e-4, weight_decay=1e-4, batch_size=32, epoch=10, datasetLen=1600, image_size=64,
                     tri_distance="cosine", w_cls=1.0, w_inst=1.0, warmup_steps=50, augment="crop_flip",
                     vit_weights=None),
    }
    assert train.RELEASED_RECIPE == dict(lr=1e-5, weight_decay=1e-3, batch_size=2, epoch=50, datasetLen=5000)
    assert CLIP_MODEL_NAME == "ViT-B-16-quickgelu" == PRESETS["b16"].sampler.clip_model
    assert PRESETS["b16"].sampler.random_clip is None and PRESETS["b16"].sampler.surgery_depth == 6
    assert TINY_CLIP_CFG == dict(
        embed_dim=64, quick_gelu=True,
        vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=4, head_width=64, mlp_ratio=4.0),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    assert PRESETS["tiny"].sampler.surgery_depth == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].recipe.lr = 1.0


def test_sampler_options_come_from_the_preset_unless_a_flag_sets_them(monkeypatch):
    # A preset with other sampler options is trained, cached and visualised with them: train.py's flags,
    # build_model, the mask-cache key and the tools all read them through utils.presets.sampler_options.
    from models.vxl_cache import expected_cache_key

    other = dataclasses.replace(PRESETS["tiny"], name="tiny_other", sampler=dataclasses.replace(
        PRESETS["tiny"].sampler, keep_ratio=0.5, prompt="a sketch of {}", vxl_norm="channel"))
    monkeypatch.setitem(PRESETS, "tiny_other", other)
    args = train.resolve_args(train.get_args_parser().parse_args(["--arch", "tiny_other"]))
    assert (args.keep_ratio, args.prompt, args.vxl_norm, args.clip_input_norm) == (0.5, "a sketch of {}", "channel",
                                                                                  "encoder")
    sampler = build_model(SimpleNamespace(arch="tiny_other")).sampler
    assert (sampler.keep_ratio, sampler.prompt, sampler.feature_norm) == (0.5, "a sketch of {}", "channel")
    key = expected_cache_key(SimpleNamespace(arch="tiny_other"))
    assert (key["keep_ratio"], key["prompt"], key["feature_norm"]) == (0.5, "a sketch of {}", "channel")
    flagged = train.resolve_args(train.get_args_parser().parse_args(["--arch", "tiny_other", "--keep_ratio", "0.2"]))
    assert flagged.keep_ratio == 0.2 and flagged.prompt == "a sketch of {}"
    assert "tiny_other: 0.5" in " ".join(train.get_args_parser().format_help().split())


def test_train_fills_each_flag_from_the_preset_and_shows_every_default():
    b16, tiny = parse_train_args(["--data_path", "/data"]), parse_train_args([])
    for args, preset in ((b16, PRESETS["b16"]), (tiny, PRESETS["tiny"])):
        assert args.arch == preset.name
        recipe = dataclasses.asdict(preset.recipe)
        recipe["tri_distance"] = recipe["tri_distance"] or losses.default_distance(args.variant)
        assert {k: getattr(args, k) for k in recipe} == recipe
    assert b16.tri_distance == "euclidean" and b16.vit_weights == "vit_base_patch16_224.orig_in21k"
    assert parse_train_args(["--data_path", "/data", "--vit_weights", "none"]).vit_weights is None
    assert (default_arch(True), default_arch(False)) == ("tiny", "b16")
    text = " ".join(train.get_args_parser().format_help().split())  # argparse wraps lines
    for shown in ("b16: 1e-05, tiny: 0.0005", "b16: 0.001, tiny: 0.0001", "b16: 50, tiny: 10", "b16: 2, tiny: 32",
                  "b16: 5000, tiny: 1600", "b16: 224, tiny: 64", "b16: by variant, tiny: cosine",
                  "b16: 0.0, tiny: 1.0", "b16: vit_base_patch16_224.orig_in21k, tiny: none", "{b16,tiny}"):
        assert shown in text, shown


def test_a_new_preset_is_one_entry(monkeypatch):
    """Registering a preset is enough: train.py's --arch takes it, fills its recipe; the models build it."""
    tiny = PRESETS["tiny"]
    micro = dataclasses.replace(tiny, name="micro", description="two blocks",
                                encoder=dataclasses.replace(tiny.encoder, depth=2),
                                recipe=dataclasses.replace(tiny.recipe, lr=1e-3, epoch=3, batch_size=8))
    monkeypatch.setitem(PRESETS, "micro", micro)

    parser = train.get_args_parser()  # after the patch: --arch's choices are read when the parser is built
    assert "micro = two blocks" in " ".join(parser.format_help().split())
    args = train.resolve_args(parser.parse_args(["--exp", "micro_run", "--arch", "micro"]))
    assert (args.lr, args.epoch, args.batch_size, args.weight_decay, args.datasetLen, args.image_size) == (
        1e-3, 3, 8, 1e-4, 1600, 64)
    assert (args.tri_distance, args.w_cls, args.vit_weights) == ("cosine", 1.0, None)

    model = build_model(SimpleNamespace(arch="micro"), with_sampler=False)
    assert len(model.encoder.vit.blocks) == 2
    assert model.interaction.decoder.num_layers == tiny.interaction.num_layers
    assert build_vxl_sampler("micro").surgery_depth == tiny.sampler.surgery_depth  # its random CLIP


def test_an_unknown_preset_names_the_known_ones(capsys):
    with pytest.raises(ValueError, match=r"unknown preset \(--arch\) 'huge'; choose one of \['b16', 'tiny'\]"):
        get_preset("huge")
    with pytest.raises(ValueError, match=r"'huge'.*\['b16', 'tiny'\]"):
        build_model(SimpleNamespace(arch="huge"), with_sampler=False)
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--arch", "huge"])
    assert "invalid choice: 'huge' (choose from" in capsys.readouterr().err


def test_visualize_masks_takes_train_py_default_arch():
    from tools import visualize_masks

    def arch(*argv):
        return visualize_masks.resolve_settings(visualize_masks.get_args_parser().parse_args(list(argv)))["arch"]

    assert arch() == default_arch(synthetic=True) == "tiny"
    assert arch("--data_path", "/data") == default_arch(synthetic=False) == "b16"
    assert arch("--clip_weights", "ViT-B-16.pt") == "b16"  # its own photos with OpenAI's CLIP (module doc)
    assert arch("--arch", "tiny", "--data_path", "/data") == "tiny"


def test_instance_loss_flag_is_resolved_and_checked():
    assert parse_train_args([]).w_inst == PRESETS["tiny"].recipe.w_inst
    assert parse_train_args(["--data_path", "/data"]).w_inst == 0.0  # b16: the paper's loss
    assert parse_train_args(["--w_inst", "0.5"]).w_inst == 0.5
    with pytest.raises(train.UserError, match="--w_inst must be >= 0"):
        parse_train_args(["--w_inst", "-1"])
