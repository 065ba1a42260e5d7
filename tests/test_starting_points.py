"""Starting points (models/vit_architecture.py, docs/starting_points.md): the encoder built as its checkpoint's timm
architecture computes what timm's model computes; a checkpoint that does not fit is refused; the VxL sampler's CLIP
is loaded with the activation its file was trained with. Offline: timm's and open_clip's models with random weights.
"""
import json
import logging
from dataclasses import asdict
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

import train
from models import build_model
from models.encoder import SketchPhotoEncoder, load_vit_weights
from models.vit_architecture import (STARTING_POINTS, VitArchitectureError, ln_eps_mismatch,
                                     read_vit_architecture, timm_state_dict_shapes)
from models.vxl_sampler import VxLSampler, clip_file_activation, tiny_clip_cfg
from models.weight_errors import WeightMismatchError
from utils.config import ConfigError, make_config, read_config_file
from utils.presets import VitSizes
from conftest import empty_data_root  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
DEPTH = 2  # timm's real architectures, two blocks deep: the values are checked without ViT-B's 12 blocks
CLIP_TAGS = ("vit_base_patch16_clip_quickgelu_224.openai", "vit_base_patch16_clip_224.laion2b")


def _timm_model(tag: str) -> torch.nn.Module:
    """timm's model of ``tag``, two blocks deep, every parameter moved off its init (LayerNorm scales off 1, biases
    off 0), so that each one is checked."""
    torch.manual_seed(0)
    model = timm.create_model(tag, pretrained=False, depth=DEPTH).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _save_timm_checkpoint(model: torch.nn.Module, path: Path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _encoder_as(tag: str) -> SketchPhotoEncoder:
    """Our encoder built as ``tag``'s architecture (two blocks deep)."""
    architecture = read_vit_architecture(tag, depth=DEPTH)
    return SketchPhotoEncoder(**asdict(architecture.sizes), **architecture.layers(), stem_channels=(8, 16, 32),
                              dropout=0.0, ln_eps=architecture.ln_eps, input_norm="none").eval()


def _take_the_stem_out(encoder: SketchPhotoEncoder) -> None:
    """The patch embedding (proj(x) + stem(x)) / 2 made timm's proj(x), exactly: the stem's last conv zeroed and
    the projection doubled (a factor of 2 is exact in floating point)."""
    embed = encoder.vit.patch_embed
    with torch.no_grad():
        embed.stem[-1].weight.zero_()
        embed.proj.weight.mul_(2)
        if embed.proj.bias is not None:
            embed.proj.bias.mul_(2)


@pytest.mark.parametrize("tag", list(STARTING_POINTS))
def test_each_starting_point_loads_and_gives_timms_cls_embedding(tag, tmp_path):
    reference = _timm_model(tag)
    encoder = _encoder_as(tag)
    report = load_vit_weights(encoder, _save_timm_checkpoint(reference, tmp_path / "vit.safetensors"), vit_arch=tag)
    assert report["missing"] == report["unexpected"] == [] and report["random_init"]  # only the stem
    _take_the_stem_out(encoder)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = encoder.embed(images, "sketch"), reference.forward_features(images)[:, 0]  # [1, 768]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_what_each_architecture_is_built_as():
    built = {tag: read_vit_architecture(tag) for tag in STARTING_POINTS}
    clip = {tag: (a.pre_norm, a.act_layer.__name__, a.ln_eps) for tag, a in built.items() if "clip" in tag}
    assert clip == {"vit_base_patch16_clip_quickgelu_224.openai": (True, "QuickGELU", 1e-5),
                    "vit_base_patch16_clip_224.laion2b": (True, "GELU", 1e-5)}
    assert {(a.pre_norm, a.act_layer.__name__, a.ln_eps) for t, a in built.items() if "clip" not in t} == {
        (False, "GELU", 1e-6)}  # today's encoder: the orig_in21k default, augreg, sam, dino
    assert {a.sizes for a in built.values()} == {VitSizes(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                                          num_heads=12, mlp_ratio=4.0)}


def test_each_recipe_builds_the_b16_encoder_as_timms_model():
    """configs/starting_points/*.yaml: the b16 preset's encoder (on the meta device: keys, shapes, layers) is
    timm's model of the recipe's tag, PuXIM's stem aside."""
    files = sorted((REPO / "configs/starting_points").glob("*.yaml"))
    assert len(files) == len(STARTING_POINTS)
    for path in files:
        config = make_config(given={**read_config_file(path), "data_path": "/data"})
        tag = config.model.vit_arch
        assert tag == config.model.vit_weights and tag in STARTING_POINTS, path
        with torch.device("meta"):
            vit = build_model(config.replace(vit_weights=None), with_sampler=False).encoder.vit
        ours = {k: v.shape for k, v in vit.state_dict().items() if not k.startswith("patch_embed.stem.")}
        theirs = {k: v.shape for k, v in timm_state_dict_shapes(tag).items() if not k.startswith("head.")}
        assert ours == theirs, path
        architecture = read_vit_architecture(tag)
        assert type(vit.blocks[0].mlp.act) is architecture.act_layer
        eps = {m.eps for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)}
        assert eps == {architecture.ln_eps} == {config.model.ln_eps}, path


def test_a_clip_file_with_another_vit_arch_is_refused_naming_what_fits(tmp_path, caplog):
    path = _save_timm_checkpoint(_timm_model(CLIP_TAGS[0]), tmp_path / "clip_tower.safetensors")
    with pytest.raises(WeightMismatchError) as refused:
        load_vit_weights(_encoder_as("vit_base_patch16_224.orig_in21k"), path, vit_arch="vit_base_patch16_224")
    message = str(refused.value)
    assert "\n" not in message and "clip_tower.safetensors" in message
    assert "encoder lacks: norm_pre.bias, norm_pre.weight;" in message  # safetensors keeps its keys sorted
    assert "checkpoint lacks: patch_embed.proj.bias;" in message
    assert f"--vit_arch {CLIP_TAGS[0]} or {CLIP_TAGS[1]}" in message and "--allow_partial_weights" in message
    with caplog.at_level(logging.WARNING, logger="models.encoder"):  # on purpose: loaded, the mismatch reported
        report = load_vit_weights(_encoder_as("vit_base_patch16_224.orig_in21k"), path, allow_partial=True)
    assert report["unexpected"] == ["norm_pre.bias", "norm_pre.weight"] and "patch_embed.proj.bias" in caplog.text


def test_a_vit_of_another_patch_size_is_refused_naming_what_fits(tmp_path, monkeypatch, caplog):
    b32 = {k: torch.zeros(v.shape) for k, v in timm_state_dict_shapes("vit_base_patch32_224", depth=1).items()}
    save_file(b32, str(tmp_path / "b32.safetensors"))
    message = _train_refuses(monkeypatch, caplog, tmp_path, "--vit_weights", tmp_path / "b32.safetensors")
    assert "b32.safetensors: key 'patch_embed.proj.weight' has shape (768, 3, 32, 32)" in message
    assert ("a ViT of patch 16 and width 768 (a 14x14 token grid at 224 px, the VxL sampler's mask), e.g. "
            "vit_base_patch16_224.orig_in21k") in message and message.endswith("fits (docs/starting_points.md)")


def test_the_refusal_quoted_in_the_docs_is_the_codes(tmp_path, monkeypatch):
    page = (REPO / "docs/starting_points.md").read_text()
    quoted = next(line for line in page.splitlines() if line.startswith("clip_b16.safetensors does not fit"))
    monkeypatch.chdir(tmp_path)  # the file named as the page's command names it
    _save_timm_checkpoint(_timm_model(CLIP_TAGS[0]), tmp_path / "clip_b16.safetensors")
    with pytest.raises(WeightMismatchError) as refused:
        load_vit_weights(_encoder_as("vit_base_patch16_224"), "clip_b16.safetensors",
                         vit_arch=make_config("b16", data_path="/d", vit_weights="clip_b16.safetensors").model.vit_arch)
    assert str(refused.value) == quoted


def _train_refuses(monkeypatch, caplog, tmp_path, *flags) -> str:
    """train.py's one-line message and exit status 2 for ``flags``, with no data read."""
    import datasets

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the starting point was checked")

    monkeypatch.setattr(datasets, "build_datasets", no_data)
    argv = ["--data_path", str(empty_data_root(tmp_path / "data")), "--output_dir", str(tmp_path / "runs"),
            "--device", "cpu", "--no_progress", *map(str, flags)]
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_bad_starting_points_stop_train_with_one_line_before_any_data(monkeypatch, caplog, tmp_path):
    clip_file = _save_timm_checkpoint(_timm_model(CLIP_TAGS[1]), tmp_path / "laion_tower.safetensors")
    message = _train_refuses(monkeypatch, caplog, tmp_path, "--vit_weights", clip_file)
    assert "laion_tower.safetensors does not fit" in message and f"--vit_arch {CLIP_TAGS[0]} or" in message
    caplog.clear()
    (tmp_path / "notes.pth").write_text("not weights")
    message = _train_refuses(monkeypatch, caplog, tmp_path, "--vit_weights", tmp_path / "notes.pth")
    assert "notes.pth: not a readable PyTorch state dict" in message and "timm tag" in message
    caplog.clear()
    message = _train_refuses(monkeypatch, caplog, tmp_path, "--vit_weights", "vit_base_patch16_224.nowhere")
    assert message.startswith("--vit_weights vit_base_patch16_224.nowhere: timm cannot build it")
    caplog.clear()
    message = _train_refuses(monkeypatch, caplog, tmp_path, "--vit_arch", "vit_base_patch32_224.augreg_in21k")
    assert "patch 32" in message and "14x14 token grid" in message and "vit_base_patch16_224.orig_in21k" in message


def test_submit_refuses_a_starting_point_that_does_not_fit_before_queueing(tmp_path, monkeypatch, capsys):
    import tools.submit as submit

    def no_queue(*args, **kwargs):
        raise AssertionError("a job was queued")

    monkeypatch.setattr(submit, "make_executor", no_queue)
    clip_file = _save_timm_checkpoint(_timm_model(CLIP_TAGS[0]), tmp_path / "openai_tower.safetensors")
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as exc:
        submit.main(["--cluster", "local", "--", "--data_path", str(tmp_path / "data"), "--output_dir",
                     str(tmp_path / "runs"), "--exp", "x", "--vit_weights", clip_file])
    assert exc.value.code == 2
    assert "openai_tower.safetensors does not fit the encoder" in capsys.readouterr().err


def test_resume_reads_no_starting_weights(bench, tmp_path):
    """The checkpoint gives every weight: the starting file may be gone, the tag would not be downloaded again."""
    from conftest import train_args  # tests/ is on sys.path

    vit = build_model(make_config("tiny"), with_sampler=False).encoder.vit.state_dict()
    save_file({k: v for k, v in vit.items() if not k.startswith("patch_embed.stem.")},
              str(tmp_path / "vit.safetensors"))
    short = ["--datasetLen", "4", "--batch_size", "4", "--eval_per_class", "1", "--vit_weights",
             tmp_path / "vit.safetensors"]
    assert train.main(train_args(bench, tmp_path, "run", "--epoch", "1", *short))["global_step"] == 1
    (tmp_path / "vit.safetensors").unlink()
    assert train.main(train_args(bench, tmp_path, "run", "--epoch", "2", "--resume", *short))["global_step"] == 2


def test_unknown_and_unbuildable_architectures_are_config_errors():
    with pytest.raises(ConfigError, match=r"^--vit_weights vit_nonexistent_9\.x: timm [\d.]+ knows no such model"):
        make_config("b16", data_path="/d", vit_weights="vit_nonexistent_9.x")
    with pytest.raises(ConfigError, match="resnet50: the encoder cannot be built.*not timm's VisionTransformer"):
        make_config("b16", data_path="/d", vit_arch="resnet50")
    with pytest.raises(ConfigError, match="no register tokens|register tokens"):
        make_config("b16", data_path="/d", vit_arch="vit_base_patch16_reg4_gap_256")
    with pytest.raises(ConfigError, match="leave --vit_arch out"):  # the tiny preset is no ViT-B
        make_config("tiny", vit_arch="vit_base_patch16_224")
    with pytest.raises(VitArchitectureError, match="knows no such model"):
        read_vit_architecture("vit_nonexistent_9")


def test_an_unknown_pretrained_tag_names_the_tags_that_exist():
    with pytest.raises(ConfigError) as refused:
        make_config("b16", data_path="/d", vit_weights="vit_base_patch16_224.nosuchtag")
    message = str(refused.value)
    assert "Invalid pretrained tag" in message and "timm's pretrained tags of vit_base_patch16_224:" in message
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k" in message  # timm's, not only the supported ones
    assert "the supported starting points are vit_base_patch16_224.orig_in21k" in message


@pytest.mark.parametrize("keywords, what", [
    (dict(proj_bias=False), "linear layers without bias"),
    (dict(pos_embed="none"), "no position embedding"),
    (dict(embed_norm_layer=torch.nn.LayerNorm), "a norm after the patch embedding"),
    (dict(dynamic_img_size=True), "a dynamic image size"),
    (dict(dynamic_img_pad=True), "a dynamic image size or padding"),
])
def test_vits_the_encoder_does_not_build_are_refused(keywords, what):
    with pytest.raises(VitArchitectureError, match=f"cannot be built as this model \\({what}"):
        read_vit_architecture("vit_base_patch16_224", depth=1, **keywords)


def test_a_vit_arch_given_alone_names_the_weights_or_is_refused():
    from models import check_starting_weights

    clip = make_config("b16", data_path="/d", vit_arch=CLIP_TAGS[0])
    assert clip.model.vit_weights == clip.model.vit_arch == CLIP_TAGS[0]  # not the default orig_in21k weights
    check_starting_weights(clip)  # they fit the encoder (no download: timm's keys and shapes)
    plain = make_config("b16", data_path="/d", vit_arch="vit_base_patch16_224")
    assert plain.model.vit_weights == "vit_base_patch16_224.orig_in21k"  # the default weights fit that network
    with pytest.raises(ConfigError, match=r"--vit_weights is still the default vit_base_patch16_224\.orig_in21k.*"
                                          r"pass --vit_weights with a file of vit_base_patch16_clip_quickgelu_224's"):
        make_config("b16", data_path="/d", vit_arch="vit_base_patch16_clip_quickgelu_224")
    given = make_config("b16", data_path="/d", vit_arch=CLIP_TAGS[0], vit_weights=None)
    assert given.model.vit_weights is None  # --vit_weights given: kept


def test_an_ln_eps_other_than_the_architectures_is_warned(tmp_path, caplog):
    older = tmp_path / "args.json"  # a run from before --vit_arch that started from OpenAI's tower
    older.write_text(json.dumps({"model": {"vit_weights": CLIP_TAGS[0], "ln_eps": 1e-6}}))
    configs = {"flag": make_config("b16", data_path="/d", ln_eps=1e-5),
               "--config": make_config(given={**read_config_file(older), "data_path": "/d"}),
               "b16": make_config("b16", data_path="/d"), "tiny": make_config("tiny"),
               "same": make_config("b16", data_path="/d", vit_arch=CLIP_TAGS[0], ln_eps=1e-5)}
    warned = {name: ln_eps_mismatch(config.model) or "" for name, config in configs.items()}
    assert "--ln_eps 1e-05 is not the LayerNorm eps of vit_base_patch16_224.orig_in21k, 1e-06" in warned["flag"]
    assert f"--ln_eps 1e-06 is not the LayerNorm eps of {CLIP_TAGS[0]}, 1e-05" in warned["--config"]
    assert warned["b16"] == warned["tiny"] == warned["same"] == ""


def test_old_runs_keep_todays_architecture_and_resume():
    from utils.config import config_from_saved, resume_differences

    saved = make_config("b16", data_path="/d").to_dict()
    del saved["model"]["vit_arch"]  # a run from before --vit_arch, started from the CLIP tower's tag
    saved["model"]["vit_weights"] = "vit_base_patch16_clip_224.openai"
    old = config_from_saved(saved)
    assert old.model.vit_arch is None and old.model.ln_eps == 1e-6  # built then as timm's plain ViT
    again = make_config("b16", data_path="/d")
    assert again.model.vit_arch == "vit_base_patch16_224.orig_in21k"  # from the --vit_weights tag
    assert resume_differences(again, old)[0] == []  # the same network
    clip = make_config("b16", data_path="/d", vit_arch=CLIP_TAGS[0])
    assert [d[0] for d in resume_differences(clip, old)[0]] == ["vit_arch", "ln_eps"]


# ----------------------------------------------------------------------------- the VxL sampler's CLIP
def _clip_checkpoint(tmp_path: Path, name: str, *, quick_gelu: bool, openai_entries: bool = False) -> Path:
    """A small random open_clip CLIP saved as open_clip saves it (OpenAI's release adds three entries)."""
    torch.manual_seed(1)
    clip = open_clip.CLIP(**dict(tiny_clip_cfg(), quick_gelu=quick_gelu))
    state_dict = dict(clip.state_dict())
    if openai_entries:
        state_dict.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77),
                          vocab_size=torch.tensor(49408))
    (tmp_path / name).mkdir()
    torch.save(state_dict, tmp_path / name / "weights.pt")
    return tmp_path / name / "weights.pt"


def _beside(path: Path, quick_gelu=None) -> None:
    """open_clip's open_clip_config.json beside ``path``; ``quick_gelu`` None leaves the key out, as LAION's do."""
    cfg = {k: v for k, v in tiny_clip_cfg().items() if k != "quick_gelu"}
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    (path.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))


@pytest.fixture
def tiny_b(monkeypatch):
    """Small stand-ins for open_clip's ViT-B-16 / ViT-B-16-quickgelu, so that the b16 path loads in a moment."""
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, "Tiny-B", dict(tiny_clip_cfg(), quick_gelu=False))
    monkeypatch.setitem(factory._MODEL_CONFIGS, "Tiny-B-quickgelu", tiny_clip_cfg())


def _act(sampler: VxLSampler) -> str:
    return type(sampler.clip.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_a_clip_file_says_its_activation_or_is_refused(tmp_path, tiny_b):
    openai = _clip_checkpoint(tmp_path, "openai", quick_gelu=True, openai_entries=True)
    laion = _clip_checkpoint(tmp_path, "laion", quick_gelu=False)
    _beside(laion)
    unsaid = _clip_checkpoint(tmp_path, "unsaid", quick_gelu=False)
    assert _act(VxLSampler.from_pretrained(str(openai), model_name="Tiny-B-quickgelu", surgery_depth=2)) == "QuickGELU"
    assert _act(VxLSampler.from_pretrained(str(laion), model_name="Tiny-B-quickgelu", surgery_depth=2)) == "GELU"
    assert clip_file_activation(str(laion), {})[0] is False
    _beside(laion, quick_gelu=True)
    assert clip_file_activation(str(laion), {})[0] is True
    with pytest.raises(WeightMismatchError, match="QuickGELU.*GELU.*open_clip_config.json") as refused:
        VxLSampler.from_pretrained(str(unsaid), model_name="Tiny-B-quickgelu", surgery_depth=2)
    assert "unsaid/weights.pt" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(WeightMismatchError, match="QuickGELU weights.*uses GELU"):  # the preset's config says GELU
        VxLSampler.from_pretrained(str(openai), model_cfg=dict(tiny_clip_cfg(), quick_gelu=False), surgery_depth=2)


def test_open_clips_safetensors_file_loads(tmp_path, tiny_b):
    """LAION's hub repositories ship open_clip_model.safetensors beside their open_clip_config.json."""
    state_dict = torch.load(_clip_checkpoint(tmp_path, "laion", quick_gelu=False), weights_only=True)
    path = tmp_path / "laion" / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    _beside(path)
    sampler = VxLSampler.from_pretrained(str(path), model_name="Tiny-B-quickgelu", surgery_depth=2)
    assert _act(sampler) == "GELU"
    torch.testing.assert_close(sampler.clip.state_dict()["visual.proj"], state_dict["visual.proj"])


@pytest.mark.parametrize("content", ["timm", "random"])
def test_a_file_that_is_no_clip_is_refused_by_its_keys_before_its_activation(tmp_path, tiny_b, content):
    state_dict = (dict(_timm_model("vit_base_patch16_224").state_dict()) if content == "timm"  # [2 blocks]
                  else {"weight": torch.zeros(3)})
    torch.save(state_dict, tmp_path / "weights.pt")  # and no open_clip_config.json: the activation unsaid
    with pytest.raises(WeightMismatchError, match="not an OpenAI-format CLIP checkpoint.*its keys: missing") as no:
        VxLSampler.from_pretrained(str(tmp_path / "weights.pt"), model_name="Tiny-B-quickgelu", surgery_depth=2)
    assert "QuickGELU" not in str(no.value)
