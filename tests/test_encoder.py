"""The sketch/photo encoder: presets, the averaged conv-stem patch embedding, dropout, weight loading."""
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from conftest import preset_encoder  # tests/ is on sys.path
from models.encoder import WeightLoadError, load_vit_weights
from utils.config import config_from_saved, make_config
from utils.presets import ARCHITECTURES, PRESETS

TINY = dataclasses.asdict(ARCHITECTURES["tiny"].encoder)


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return preset_encoder("tiny").eval()


def test_presets_match_the_reference():
    b16 = dataclasses.asdict(ARCHITECTURES["b16"].encoder)
    assert (b16["img_size"], b16["patch_size"], b16["embed_dim"], b16["depth"], b16["num_heads"],
            b16["mlp_ratio"], PRESETS["b16"].model.dropout) == (224, 16, 768, 12, 12, 4.0, 0.1)
    assert tuple(b16["stem_channels"]) == (64, 128, 256)
    assert (TINY["img_size"], TINY["patch_size"], TINY["embed_dim"], TINY["depth"], TINY["num_heads"],
            TINY["mlp_ratio"]) == (64, 8, 192, 4, 3, 4.0)


def test_b16_stem_layout():
    # Built on the meta device: the layout without paying for ViT-B/16's initialisation.
    with torch.device("meta"):
        enc = preset_encoder("b16")
    stem = enc.vit.patch_embed.stem
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    got = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.bias) for c in convs]
    assert got == [(3, 64, 7, 2, 3, None), (64, 128, 3, 2, 1, None), (128, 256, 3, 2, 1, None),
                   (256, 768, 3, 2, 1, None)]
    assert [type(m).__name__ for m in stem] == ["Conv2d", "ReLU"] * 3 + ["Conv2d"]
    proj = enc.vit.patch_embed.proj
    assert (proj.kernel_size, proj.stride, proj.out_channels) == ((16, 16), (16, 16), 768)
    assert enc.num_patches == 196 and enc.grid_size == (14, 14) and enc.img_size == 224
    out = enc(torch.empty(2, 3, 224, 224, device="meta"), "sketch")
    assert tuple(out.shape) == (2, 197, 768)
    # ViT-B/16 = 85,798,656 parameters without a head; the stem adds 3*64*49 + 64*128*9 + 128*256*9 + 256*768*9.
    stem_params = sum(p.numel() for p in enc.stem_parameters())
    assert stem_params == 3 * 64 * 49 + 64 * 128 * 9 + 128 * 256 * 9 + 256 * 768 * 9 == 2_147_520
    assert sum(p.numel() for p in enc.parameters()) == 85_798_656 + 2_147_520


def test_dropout_placement():
    assert PRESETS["tiny"].model.dropout == 0.0  # the CPU preset trains without dropout
    vit = preset_encoder("tiny", dropout=0.1).vit  # where the paper's 0.1 goes
    assert vit.pos_drop.p == 0.1  # embeddings
    for blk in vit.blocks:
        assert blk.attn.proj_drop.p == 0.1  # attention output
        assert blk.mlp.drop1.p == 0.1 and blk.mlp.drop2.p == 0.1  # MLP
        assert blk.attn.attn_drop.p == 0.0  # no dropout on attention weights
        assert isinstance(blk.drop_path1, torch.nn.Identity)
    assert not isinstance(vit.norm, torch.nn.Identity)  # final LayerNorm
    custom = preset_encoder("tiny", dropout=0.0)
    assert custom.vit.pos_drop.p == 0.0 and custom.vit.blocks[0].mlp.drop2.p == 0.0


def test_tiny_stem_layout_and_shapes(tiny_encoder):
    convs = [m for m in tiny_encoder.vit.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1]  # total stride 8 = patch size
    assert [c.out_channels for c in convs] == [16, 32, 64, 192]
    x = torch.randn(3, 3, 64, 64)
    tokens = tiny_encoder(x, "photo")
    assert tokens.shape == (3, 1 + 64, 192)
    assert tiny_encoder.num_patches == 64 and tiny_encoder.grid_size == (8, 8) and tiny_encoder.embed_dim == 192
    torch.testing.assert_close(tiny_encoder.embed(x, "photo"), tokens[:, 0])


def test_patch_embed_is_the_average_of_conv_and_stem():
    pe = preset_encoder("tiny", stem_norm="none").vit.patch_embed  # the paper's stem, tiny sizes
    x = torch.randn(2, 3, 64, 64)
    w = [m.weight for m in pe.stem if isinstance(m, torch.nn.Conv2d)]
    # The stem written out with the functional API.
    s = F.relu(F.conv2d(x, w[0], stride=2, padding=3))
    s = F.relu(F.conv2d(s, w[1], stride=2, padding=1))
    s = F.relu(F.conv2d(s, w[2], stride=2, padding=1))
    s = F.conv2d(s, w[3], stride=1, padding=1)  # [2, 192, 8, 8]
    p = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=8)  # [2, 192, 8, 8]
    expected = ((s + p) / 2).flatten(2).transpose(1, 2)  # [2, 64, 192]
    torch.testing.assert_close(pe(x), expected, rtol=1e-5, atol=1e-5)


def test_tiny_stem_batch_norm():
    # The tiny preset's deviation: conv, BatchNorm, ReLU (x3), conv, BatchNorm; b16 keeps the paper's stem.
    assert PRESETS["tiny"].model.stem_norm == "batch" and PRESETS["b16"].model.stem_norm == "none"
    torch.manual_seed(0)
    enc = preset_encoder("tiny").train()
    stem = enc.vit.patch_embed.stem
    assert [type(m).__name__ for m in stem] == (["Conv2d", "ModalityBatchNorm2d", "ReLU"] * 3
                                                + ["Conv2d", "ModalityBatchNorm2d"])
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    x = torch.rand(4, 3, 64, 64)
    # Written out: training-mode BatchNorm uses the batch's own statistics (biased variance, eps 1e-5).
    s = x
    for i, (conv, stride, pad) in enumerate(zip(convs, (2, 2, 2, 1), (3, 1, 1, 1))):
        s = F.conv2d(s, conv.weight, stride=stride, padding=pad)
        mean, var = s.mean(dim=(0, 2, 3), keepdim=True), s.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        s = (s - mean) / torch.sqrt(var + 1e-5)
        if i < 3:
            s = F.relu(s)
    torch.testing.assert_close(stem(x), s, rtol=1e-4, atol=1e-4)
    # So each call (sketches and photos are separate calls) starts at unit scale, whatever the input.
    out = stem(torch.rand(4, 3, 64, 64) * 0.01 + 0.9)  # [4, 192, 8, 8], nearly blank images
    assert out.mean().abs() < 1e-4 and out.std().item() == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="stem_norm"):
        preset_encoder("tiny", stem_norm="layer")


def test_stem_batch_norm_keeps_statistics_per_modality():
    """Evaluation normalises sketches with sketch statistics and photos with photo statistics."""
    torch.manual_seed(0)
    enc = preset_encoder("tiny").train()
    sketches = torch.ones(6, 3, 64, 64)  # blank white sketches with a dark stroke
    sketches[:, :, 30:34, 10:50] = -1
    photos = torch.randn(6, 3, 64, 64) * 0.5
    with torch.no_grad():
        for _ in range(200):  # running statistics converge to each modality's own
            enc(sketches, "sketch")
            enc(photos, "photo")
        trained_s, trained_p = enc(sketches, "sketch"), enc(photos, "photo")  # batch statistics
    first_bn = enc.vit.patch_embed.stem[1]
    assert not torch.allclose(first_bn.sketch.running_mean, first_bn.photo.running_mean, atol=1e-3)
    enc.eval()
    with torch.no_grad():
        eval_s, eval_p = enc(sketches, "sketch"), enc(photos, "photo")  # running statistics
    # A repeated batch: running statistics = batch statistics, up to the running variance being unbiased
    # (n/(n-1), n = 6*8*8 at the last conv). One BatchNorm shared by both would be off by O(1) here.
    torch.testing.assert_close(eval_s, trained_s, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(eval_p, trained_p, rtol=1e-2, atol=1e-2)
    keys = [k for k in enc.state_dict() if k.startswith("vit.patch_embed.stem.1.")]
    assert "vit.patch_embed.stem.1.sketch.running_mean" in keys and "vit.patch_embed.stem.1.photo.weight" in keys


def test_the_stem_norm_picks_the_encoder_class_and_only_the_batch_norm_one_sets_a_modality(monkeypatch):
    """The paper's encoder (b16, and any with stem_norm "none") never looks for stem BatchNorms."""
    from models.encoder import BatchNormStemEncoder, ModalityBatchNorm2d, PhotoStandardization, SketchPhotoEncoder

    with torch.device("meta"):
        b16 = preset_encoder("b16")
    assert type(b16) is SketchPhotoEncoder and b16.stem_norm == "none"
    assert all(isinstance(m, torch.nn.Identity) for m in b16.input_norms.values())  # photos fed as they are
    bare = preset_encoder("tiny", stem_norm="none")
    assert type(bare) is SketchPhotoEncoder and isinstance(bare.input_norms["photo"], PhotoStandardization)
    tiny = preset_encoder("tiny")
    assert type(tiny) is BatchNormStemEncoder and tiny.stem_norm == "batch"
    assert isinstance(tiny.input_norms["sketch"], torch.nn.Identity)

    calls = []
    monkeypatch.setattr(ModalityBatchNorm2d, "set_modality", staticmethod(lambda module, m: calls.append(m)))
    with torch.no_grad():
        b16(torch.empty(1, 3, 224, 224, device="meta"), "sketch")
        bare(torch.zeros(1, 3, 64, 64), "photo")
        assert calls == []
        tiny.eval()(torch.zeros(1, 3, 64, 64), "sketch")
    assert calls == ["sketch"]


def test_forward_is_the_plain_vit_on_the_embedding(tiny_encoder):
    vit = tiny_encoder.vit
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = vit.patch_embed(x)  # [2, 64, 192]
        h = torch.cat([vit.cls_token.expand(2, -1, -1), h], dim=1) + vit.pos_embed
        for blk in vit.blocks:  # pre-norm residual blocks
            h = h + blk.attn(blk.norm1(h))
            h = h + blk.mlp(blk.norm2(h))
        h = F.layer_norm(h, (192,), vit.norm.weight, vit.norm.bias, eps=vit.norm.eps)
        torch.testing.assert_close(tiny_encoder(x, "sketch"), h, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_training():
    tiny_encoder = preset_encoder("tiny", dropout=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        try:
            tiny_encoder.train()
            assert not torch.allclose(tiny_encoder(x), tiny_encoder(x))
        finally:
            tiny_encoder.eval()
        torch.testing.assert_close(tiny_encoder(x), tiny_encoder(x))


def test_shared_and_separate_encoders():
    x = torch.randn(2, 3, 64, 64)
    shared = preset_encoder("tiny", input_norm="none").eval()  # photos fed as they are, like sketches
    torch.testing.assert_close(shared(x, "sketch"), shared(x, "photo"))
    untied = preset_encoder("tiny", separate_photo_encoder=True).eval()
    assert untied.photo_vit is not None
    assert not torch.allclose(untied(x, "sketch"), untied(x, "photo"))
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in untied.parameters()) == 2 * n_shared


def test_bad_inputs(tiny_encoder):
    with pytest.raises(ValueError, match="modality"):
        tiny_encoder(torch.randn(1, 3, 64, 64), "drawing")
    with pytest.raises(ValueError, match="64x64"):
        tiny_encoder(torch.randn(1, 3, 32, 32))
    from models.encoder import build_encoder

    with pytest.raises(ValueError, match=r"unknown preset \(--arch\) 'vit_huge'"):
        build_encoder("vit_huge", separate_photo_encoder=False, dropout=0.0, stem_norm="none", ln_eps=1e-6,
                      input_norm="none")


def _layer_norms(encoder):
    return [m for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)]


def test_ln_eps_reaches_every_layer_norm():
    """Default timm's 1e-6; ln_eps=1e-5 (the released ViT's, torch's) on every LayerNorm, same weights."""
    assert PRESETS["b16"].model.ln_eps == PRESETS["tiny"].model.ln_eps == 1e-6
    torch.manual_seed(0)
    default = preset_encoder("tiny", separate_photo_encoder=True).eval()
    torch.manual_seed(0)
    released = preset_encoder("tiny", separate_photo_encoder=True, ln_eps=1e-5).eval()
    n_blocks = TINY["depth"]
    for enc, eps in ((default, 1e-6), (released, 1e-5)):
        norms = _layer_norms(enc)
        assert len(norms) == 2 * (2 * n_blocks + 1)  # norm1, norm2 per block and the final norm, x2 ViTs
        assert {m.eps for m in norms} == {eps}
    with torch.device("meta"):
        assert {m.eps for m in _layer_norms(preset_encoder("b16", ln_eps=1e-5))} == {1e-5}
    sd = default.state_dict()  # the parameters do not depend on eps: a checkpoint loads into either
    assert sd.keys() == released.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in released.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out_default, out_released = default(x, "sketch"), released(x, "sketch")
    assert not torch.equal(out_default, out_released)
    with torch.no_grad():  # the released encoder is the plain ViT with eps 1e-5 in its final norm too
        vit = released.vit
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        h = vit.blocks(h)
        ref = F.layer_norm(h, (TINY["embed_dim"],), vit.norm.weight, vit.norm.bias, eps=1e-5)
    torch.testing.assert_close(out_released, ref, rtol=1e-5, atol=1e-5)


def test_build_model_reads_ln_eps_and_old_args_rebuild_the_default():
    from models import build_model

    def eps_of(config):
        return {m.eps for m in _layer_norms(build_model(config, with_sampler=False).encoder)}

    assert eps_of(make_config("tiny", ln_eps=1e-5)) == {1e-5}
    assert eps_of(config_from_saved({"arch": "tiny", "ln_eps": None})) == {1e-6}  # format 1's "the preset's"
    assert eps_of(config_from_saved({"arch": "tiny"})) == {1e-6}  # a checkpoint's args from before --ln_eps


# ----------------------------------------------------------------------------- weight loading
def _timm_tiny_vit(img_size=64, num_classes=10) -> VisionTransformer:
    """A plain timm ViT of the tiny preset's shape, with a classifier head (as released checkpoints)."""
    torch.manual_seed(1)
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=192, depth=4, num_heads=3,
                             num_classes=num_classes)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_vit_weights(tmp_path, suffix, caplog):
    source = _timm_tiny_vit().state_dict()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    else:
        torch.save(source, path)
    enc = preset_encoder("tiny")
    stem_before = {k: v.clone() for k, v in enc.vit.patch_embed.stem.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="models.encoder"):
        report = load_vit_weights(enc, str(path))

    target = enc.vit.state_dict()
    for key, value in source.items():
        if key.startswith("head."):
            continue
        torch.testing.assert_close(target[key], value, rtol=0, atol=0)
    for key, value in stem_before.items():  # stem untouched, reported as random
        torch.testing.assert_close(target[f"patch_embed.stem.{key}"], value, rtol=0, atol=0)
    assert sorted(report["ignored_head"]) == ["head.bias", "head.weight"]
    assert sorted(report["random_init"]) == sorted(f"patch_embed.stem.{k}" for k in stem_before)
    assert report["missing"] == [] and report["unexpected"] == [] and report["resampled"] == {}
    assert len(report["loaded"]) == len(source) - 2
    assert "initialised randomly" in caplog.text


def test_load_vit_weights_into_both_untied_encoders(tmp_path):
    source = _timm_tiny_vit().state_dict()
    torch.save(source, tmp_path / "vit.pth")
    enc = preset_encoder("tiny", separate_photo_encoder=True)
    load_vit_weights(enc, str(tmp_path / "vit.pth"))
    for vit in (enc.vit, enc.photo_vit):
        torch.testing.assert_close(vit.blocks[2].mlp.fc1.weight, source["blocks.2.mlp.fc1.weight"], rtol=0, atol=0)


def test_load_vit_weights_resamples_pos_embed(tmp_path):
    source = _timm_tiny_vit(img_size=32).state_dict()  # 4x4 grid: pos_embed [1, 17, 192]
    torch.save(source, tmp_path / "vit32.pth")
    enc = preset_encoder("tiny")
    report = load_vit_weights(enc, str(tmp_path / "vit32.pth"))
    assert report["resampled"] == {"pos_embed": ((1, 17, 192), (1, 65, 192))}
    pos = enc.vit.pos_embed.detach()
    old = source["pos_embed"]
    torch.testing.assert_close(pos[:, :1], old[:, :1])  # CLS position untouched
    grid = old[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 64, 192))


def test_load_vit_weights_errors(tmp_path, caplog):
    source = _timm_tiny_vit().state_dict()
    bad = dict(source)
    bad["blocks.1.attn.qkv.weight"] = torch.zeros(10, 192)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight.*\(10, 192\).*\(576, 192\)"):
        load_vit_weights(preset_encoder("tiny"), str(tmp_path / "bad.pth"))

    partial_sd = {k: v for k, v in source.items() if k != "norm.weight"}
    partial_sd["extra.thing"] = torch.zeros(3)
    torch.save(partial_sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"lacks: extra\.thing; keys it needs that the checkpoint lacks: norm\.weight"):
        load_vit_weights(preset_encoder("tiny"), str(tmp_path / "partial.pth"))  # refused unless on purpose:
    with caplog.at_level(logging.WARNING, logger="models.encoder"):
        report = load_vit_weights(preset_encoder("tiny"), str(tmp_path / "partial.pth"), allow_partial=True)
    assert report["missing"] == ["norm.weight"] and report["unexpected"] == ["extra.thing"]
    assert "norm.weight" in caplog.text and "extra.thing" in caplog.text

    torch.save({"transformer.encoder_norm.weight": torch.zeros(192)}, tmp_path / "other_naming.pth")
    with pytest.raises(ValueError, match="other_naming.pth.*timm"):
        load_vit_weights(preset_encoder("tiny"), str(tmp_path / "other_naming.pth"))

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_vit_weights(preset_encoder("tiny"), str(tmp_path / "nowhere.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="junk.pth"):
        load_vit_weights(preset_encoder("tiny"), str(tmp_path / "junk.pth"))


def test_timm_tag_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightLoadError, match="local"):
        load_vit_weights(preset_encoder("tiny"), "vit_tiny_patch16_224.augreg_in21k")



# ----------------------------------------------------------------------------- per-photo standardisation
def test_standardize_images_by_hand():
    from models.encoder import standardize_images

    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])  # [1, 1, 2, 2]: mean 3, unbiased std sqrt(20 / 3)
    std = (20 / 3) ** 0.5
    expected = torch.tensor([[[[-3.0, -1.0], [1.0, 3.0]]]]) / (std + 1e-3)
    torch.testing.assert_close(standardize_images(x), expected)
    # two channels: each loses its own mean; one std over the image, so their relative scale is kept
    y = torch.stack([torch.tensor([[1.0, 3.0], [1.0, 3.0]]), torch.tensor([[10.0, 10.0], [12.0, 12.0]])])[None]
    centred = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]], [[-1.0, -1.0], [1.0, 1.0]]])[None]  # std over 8 values
    torch.testing.assert_close(standardize_images(y), centred / ((8 / 7) ** 0.5 + 1e-3))
    flat = torch.full((2, 3, 4, 4), 0.7)
    torch.testing.assert_close(standardize_images(flat), torch.zeros_like(flat), rtol=0, atol=1e-3)  # finite, ~0


def test_input_norm_photo_makes_photo_embeddings_ignore_brightness_and_contrast():
    """tiny standardises each photo: a * photo + b (a > 0) embeds as the photo; sketches are fed as they are."""
    from models.encoder import standardize_images

    assert PRESETS["tiny"].model.input_norm == "photo" and PRESETS["b16"].model.input_norm == "none"
    torch.manual_seed(0)
    standardized = preset_encoder("tiny").eval()
    torch.manual_seed(0)
    plain = preset_encoder("tiny", input_norm="none").eval()
    assert standardized.state_dict().keys() == plain.state_dict().keys()  # no parameters: checkpoints load in both
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1  # [3, 3, 64, 64]
    faded = 0.2 * x + 0.5  # a low-contrast, brighter copy
    with torch.no_grad():
        # the same up to eps (1e-3 against a std of 0.58 and 0.12): |diff| 0.007 here, 4.1 without the norm
        torch.testing.assert_close(standardized.embed(faded, "photo"), standardized.embed(x, "photo"),
                                   rtol=0, atol=2e-2)
        torch.testing.assert_close(standardized.embed(faded, "photo"), plain.embed(standardize_images(faded), "photo"))
        assert not torch.allclose(plain.embed(faded, "photo"), plain.embed(x, "photo"), atol=1e-2)
        assert not torch.allclose(standardized.embed(faded, "sketch"), standardized.embed(x, "sketch"), atol=1e-2)
        torch.testing.assert_close(standardized(x, "sketch"), plain(x, "sketch"))  # sketches untouched
    with pytest.raises(ValueError, match="input_norm must be one of"):
        preset_encoder("tiny", input_norm="sketch")


def test_build_model_reads_input_norm_and_old_args_rebuild_without_it():
    from models import build_model
    from models.encoder import PhotoStandardization

    def norm_of(config):
        encoder = build_model(config, with_sampler=False).encoder
        assert isinstance(encoder.input_norms["photo"], PhotoStandardization) == (encoder.input_norm == "photo")
        return encoder.input_norm

    assert norm_of(make_config("tiny")) == "photo"  # the preset's
    assert norm_of(make_config("tiny", input_norm="none")) == "none"
    assert norm_of(config_from_saved({"arch": "tiny", "input_norm": None})) == "photo"  # format 1's "the preset's"
    assert norm_of(config_from_saved({"arch": "tiny"})) == "none"  # a checkpoint's args from before --input_norm
