"""The VxL sampler against a plain, loop-by-loop re-implementation of CLIP Surgery + feature surgery."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from models.vxl_sampler import (TINY_CLIP_CFG, VxLSampler, build_tiny_clip, build_vxl_sampler,
                                load_openai_state_dict, tiny_clip_cfg)

NAMES = ["cat", "airplane", "cat"]


# tiny_sampler (conftest.py): VxLSampler.tiny(), 64x64 images, 8x8 patches -> 64 patches, surgery on the last
# 2 blocks


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 64, 64, generator=g) * 2 - 1  # encoder-normalised range [-1, 1]


# ----------------------------------------------------------------------------- the plain version
def _ln(x, m):
    return F.layer_norm(x, (x.shape[-1],), m.weight.double(), m.bias.double(), m.eps)


def _plain_attention(h, blk, value_value):
    """Multi-head attention written out head by head from the block's packed projections."""
    width = h.shape[-1]
    w, b = blk.attn.in_proj_weight.double(), blk.attn.in_proj_bias.double()
    q = h @ w[:width].T + b[:width]
    k = h @ w[width:2 * width].T + b[width:2 * width]
    v = h @ w[2 * width:].T + b[2 * width:]
    if value_value:  # CLIP Surgery: query and key replaced by the value
        q, k = v, v
    heads = blk.attn.num_heads
    d = width // heads
    outs = []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d), dim=-1)
        outs.append(a @ v[..., sl])
    o = torch.cat(outs, dim=-1)
    return o @ blk.attn.out_proj.weight.double().T + blk.attn.out_proj.bias.double()


def _plain_mlp(h, blk):
    u = h @ blk.mlp.c_fc.weight.double().T + blk.mlp.c_fc.bias.double()
    u = u * torch.sigmoid(1.702 * u)  # QuickGELU
    return u @ blk.mlp.c_proj.weight.double().T + blk.mlp.c_proj.bias.double()


def plain_surgery_tokens(clip, images, surgery_depth):
    """CLIP Surgery's image features, in float64, from the CLIP weights alone.

    Returns (surgery tokens [B, 1+N, E], normal-path tokens [B, 1+N, E])."""
    v = clip.visual
    patch = v.conv1.weight.shape[-1]
    x = F.conv2d(images.double(), v.conv1.weight.double(), stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.double().expand(x.shape[0], 1, -1), x], dim=1)
    x = _ln(x + v.positional_embedding.double(), v.ln_pre)
    blocks = v.transformer.resblocks
    x_surgery = None
    for i, blk in enumerate(blocks):
        if i >= len(blocks) - surgery_depth:
            vv = _plain_attention(_ln(x, blk.ln_1), blk, value_value=True)
            x_surgery = (x if x_surgery is None else x_surgery) + vv  # no MLP on this path
        x = x + _plain_attention(_ln(x, blk.ln_1), blk, value_value=False)
        x = x + _plain_mlp(_ln(x, blk.ln_2), blk)
    proj = v.proj.double()
    surgery = torch.cat([x[:, :1], x_surgery[:, 1:]], dim=1)
    return _ln(surgery, v.ln_post) @ proj, _ln(x, v.ln_post) @ proj


def plain_relevance(sampler, images, names, feature_norm="token"):
    feats, _ = plain_surgery_tokens(sampler.clip, images, sampler.surgery_depth)
    feats = feats / feats.norm(dim=1 if feature_norm == "token" else -1, keepdim=True)
    out = torch.zeros(images.shape[0], feats.shape[1] - 1, dtype=torch.float64)
    for b, name in enumerate(names):
        with torch.no_grad():
            t = sampler.clip.encode_text(sampler.tokenizer(["a", sampler.prompt.format(name)])).double()
        t = t / t.norm(dim=-1, keepdim=True)  # [2, E]
        f = feats[b]
        p = torch.stack([f[0] @ t[0], f[0] @ t[1]])
        w = torch.softmax(2 * p, dim=0)
        w = w / w.mean()
        for n in range(1, f.shape[0]):
            g = [f[n] * t[j] * w[j] for j in range(2)]
            mean = (g[0] + g[1]) / 2
            out[b, n - 1] = (g[1] - mean).sum()  # the class text is the last one
    return out


def plain_mask(relevance, keep_ratio):
    n = relevance.shape[1]
    n_drop = math.floor(n * (1 - keep_ratio)) + 1
    mask = torch.ones_like(relevance)
    for b in range(relevance.shape[0]):
        order = sorted(range(n), key=lambda i: (relevance[b, i].item(), i))
        for i in order[:n_drop]:
            mask[b, i] = 0
    return mask


# ----------------------------------------------------------------------------- tests
def test_plain_normal_path_matches_open_clip(tiny_sampler, images):
    """Validates the plain re-implementation itself on open_clip's own image embedding."""
    _, normal = plain_surgery_tokens(tiny_sampler.clip, images, tiny_sampler.surgery_depth)
    with torch.no_grad():
        pooled = tiny_sampler.clip.encode_image(images)
    torch.testing.assert_close(normal[:, 0].float(), pooled, rtol=1e-5, atol=1e-5)


def test_surgery_tokens_match_plain(tiny_sampler, images):
    ours = tiny_sampler.image_tokens(images)
    surgery, normal = plain_surgery_tokens(tiny_sampler.clip, images, tiny_sampler.surgery_depth)
    assert ours.shape == (3, 65, 64)
    torch.testing.assert_close(ours.double(), surgery, rtol=1e-5, atol=1e-5)
    # The patch tokens really come from the second path.
    assert (ours[:, 1:].double() - normal[:, 1:]).abs().max() > 1e-2


@pytest.mark.parametrize("feature_norm", ["token", "channel"])
def test_relevance_and_mask_match_plain(images, feature_norm):
    sampler = VxLSampler.tiny(feature_norm=feature_norm)
    rel = sampler.relevance(images, NAMES)
    ref = plain_relevance(sampler, images, NAMES, feature_norm)
    assert rel.shape == (3, 64) and rel.dtype == torch.float32
    scale = ref.abs().max().item()
    torch.testing.assert_close(rel.double() / scale, ref / scale, rtol=0, atol=1e-5)
    mask = sampler(images, NAMES)
    torch.testing.assert_close(mask, plain_mask(ref, 0.3).float(), rtol=0, atol=0)
    assert mask.sum(dim=1).tolist() == [19.0] * 3  # 64 - (floor(64 * 0.7) + 1) = 19 kept


def test_token_norm_differs_from_channel_norm(tiny_sampler, images):
    chan = VxLSampler.tiny(feature_norm="channel")
    assert not torch.allclose(tiny_sampler.relevance(images, NAMES), chan.relevance(images, NAMES))


def test_b16_mask_keeps_58_of_196():
    torch.manual_seed(0)
    s = VxLSampler.tiny(image_size=224, patch_size=16)  # ViT-B/16's grid on the tiny CLIP
    assert s.num_patches == 196 and s.num_masked == 138
    mask = s(torch.rand(2, 3, 224, 224) * 2 - 1, ["dog", "car"])
    assert mask.shape == (2, 196)
    assert mask.sum(dim=1).tolist() == [58.0, 58.0]
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_mask_ties_are_stable(tiny_sampler):
    rel = torch.zeros(1, 64)
    mask = tiny_sampler.mask_from_relevance(rel)
    assert mask[0, :45].sum() == 0 and mask[0, 45:].sum() == 19  # ties: lowest indices dropped first
    rel = torch.arange(64.0).flip(0)[None]  # descending relevance: the last 45 patches go
    assert tiny_sampler.mask_from_relevance(rel)[0, 19:].sum() == 0


def test_prompt_and_text_cache(images):
    s = VxLSampler.tiny(prompt="a photo of {}")
    calls = []
    encode_text = s.clip.encode_text

    def counting(tokens, *a, **kw):
        calls.append(tokens.shape[0])
        return encode_text(tokens, *a, **kw)

    s.clip.encode_text = counting
    t = s.text_features(["cat", "dog", "cat"])
    assert calls == [3]  # "a", "a photo of cat", "a photo of dog" in one pass
    s.text_features(["dog", "cat"])
    assert calls == [3]
    s.text_features(["cow"])
    assert calls == [3, 1]
    with torch.no_grad():
        ref = F.normalize(encode_text(s.tokenizer(["a", "a photo of cat", "a photo of dog"])), dim=-1)
    assert t.shape == (3, 2, 64)
    torch.testing.assert_close(t[0], ref[[0, 1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t[1], ref[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t[2], ref[[0, 1]], rtol=1e-5, atol=1e-6)


def test_clip_input_norm(tiny_sampler, images):
    enc_mode = tiny_sampler
    clip_mode = VxLSampler.tiny(input_norm="clip")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    converted = ((images * 0.5 + 0.5) - mean) / std
    torch.testing.assert_close(clip_mode.image_tokens(images), enc_mode.image_tokens(converted),
                               rtol=1e-5, atol=1e-5)


def test_frozen_and_always_eval(tiny_sampler, images):
    assert all(not p.requires_grad for p in tiny_sampler.parameters())
    tiny_sampler.train()
    assert not tiny_sampler.training and not any(m.training for m in tiny_sampler.modules())
    x = images.clone().requires_grad_(True)
    out = tiny_sampler.relevance(x, NAMES)
    assert out.grad_fn is None and not out.requires_grad


def test_tiny_clip_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_tiny_clip(seed=0), build_tiny_clip(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_arguments(tiny_sampler, images):
    with pytest.raises(ValueError, match="keep_ratio"):
        VxLSampler.tiny(keep_ratio=1.5)
    with pytest.raises(ValueError, match="feature_norm"):
        VxLSampler.tiny(feature_norm="pixel")
    with pytest.raises(ValueError, match="prompt"):
        VxLSampler.tiny(prompt="a photo")
    with pytest.raises(ValueError, match="surgery_depth"):
        VxLSampler.tiny(surgery_depth=9)
    with pytest.raises(ValueError, match="class names"):
        tiny_sampler.relevance(images, ["cat"])
    with pytest.raises(ValueError, match="64"):
        tiny_sampler.relevance(torch.zeros(1, 3, 32, 32), ["cat"])
    with pytest.raises(ValueError, match="--clip_weights"):
        build_vxl_sampler("b16", None)


# ----------------------------------------------------------------------------- OpenAI checkpoints
def _openai_style_state_dict(clip):
    """OpenAI's checkpoints: open_clip's key names, fp16 weights, three metadata entries."""
    sd = {k: v.half() for k, v in clip.state_dict().items()}
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return sd


def test_openai_naming_is_open_clips(tiny_sampler):
    """open_clip's own OpenAI loader accepts our OpenAI-style dict: the key names are the same."""
    sd = _openai_style_state_dict(tiny_sampler.clip)
    ref = open_clip.model.build_model_from_openai_state_dict(dict(sd), quick_gelu=True).float()
    ours = open_clip.CLIP(**tiny_clip_cfg())
    load_openai_state_dict(ours, dict(sd))
    ref_sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
def test_from_pretrained_state_dict_and_torchscript(tmp_path, tiny_sampler, images):
    clip = tiny_sampler.clip
    sd = {k: v.clone() for k, v in clip.state_dict().items()}
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "clip_sd.pt")

    # A real TorchScript archive carrying the weights, as OpenAI ships ViT-B-16.pt.
    traced_src = build_tiny_clip(seed=0)
    traced_src.load_state_dict(clip.state_dict())
    traced_src.register_buffer("input_resolution", torch.tensor(64))
    traced = torch.jit.trace_module(
        traced_src, {"encode_image": (torch.zeros(1, 3, 64, 64),),
                     "encode_text": (torch.zeros(1, 77, dtype=torch.long),)}, check_trace=False)
    torch.jit.save(traced, str(tmp_path / "clip_jit.pt"))

    expected = tiny_sampler.relevance(images, NAMES)
    for name in ("clip_sd.pt", "clip_jit.pt"):
        loaded = VxLSampler.from_pretrained(str(tmp_path / name), model_cfg=tiny_clip_cfg(), surgery_depth=2)
        assert all(not p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(loaded.relevance(images, NAMES), expected, rtol=0, atol=0)

    # fp16 weights (OpenAI's) load into the fp32 model
    torch.save(_openai_style_state_dict(clip), tmp_path / "clip_fp16.pt")
    loaded = VxLSampler.from_pretrained(str(tmp_path / "clip_fp16.pt"), model_cfg=tiny_clip_cfg(), surgery_depth=2)
    assert loaded.clip.visual.proj.dtype == torch.float32
    torch.testing.assert_close(loaded.clip.visual.proj, clip.visual.proj.half().float(), rtol=0, atol=0)

    # build_vxl_sampler("tiny", path) reads a tiny checkpoint too
    built = build_vxl_sampler("tiny", str(tmp_path / "clip_sd.pt"))
    torch.testing.assert_close(built.relevance(images, NAMES), expected, rtol=0, atol=0)


def test_from_pretrained_errors(tmp_path, tiny_sampler):
    sd = dict(tiny_sampler.clip.state_dict())
    sd["visual.proj"] = torch.zeros(128, 32)
    torch.save(sd, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"visual\.proj.*\(128, 32\).*\(128, 64\)"):
        VxLSampler.from_pretrained(str(tmp_path / "wrong.pt"), model_cfg=tiny_clip_cfg())

    missing = {k: v for k, v in tiny_sampler.clip.state_dict().items() if k != "ln_final.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="ln_final.weight"):
        VxLSampler.from_pretrained(str(tmp_path / "missing.pt"), model_cfg=tiny_clip_cfg())

    with pytest.raises(FileNotFoundError, match="none.pt"):
        VxLSampler.from_pretrained(str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        VxLSampler.from_pretrained(str(tmp_path / "junk.pt"), model_cfg=tiny_clip_cfg())

    gelu_cfg = dict(tiny_clip_cfg(), quick_gelu=False)  # plain GELU: wrong for OpenAI weights
    torch.save(_openai_style_state_dict(tiny_sampler.clip), tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="QuickGELU"):
        VxLSampler.from_pretrained(str(tmp_path / "ok.pt"), model_cfg=gelu_cfg)


def test_tiny_clip_config():
    clip = build_tiny_clip()
    assert clip.visual.transformer.resblocks[0].attn.num_heads == 2
    assert clip.vocab_size == TINY_CLIP_CFG["text_cfg"]["vocab_size"] == 49408
    assert clip.context_length == 77
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
