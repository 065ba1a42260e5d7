"""PuXIM composed: output shapes and values, masking, the interaction head, gradients, b16 sizes."""
import dataclasses

import open_clip
import pytest
import torch

from losses import build_criterion
from conftest import preset_encoder, tiny_config  # tests/ is on sys.path
from models import InteractionHead, PuXIM, VxLSampler, build_model, model_summary
from utils.config import ConfigError, make_config
from utils.presets import ARCHITECTURES

B16_INTERACTION = dict(dataclasses.asdict(ARCHITECTURES["b16"].interaction), dropout=0.1)

B = 2


def _batch(size=64, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.rand(b, 3, size, size, generator=g) * 2 - 1  # noqa: E731
    return dict(sketch=img(), positive=img(), negative=img(),
                positive_class=["cat", "dog"][:b], negative_class=["car", "cup"][:b])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config())


# ----------------------------------------------------------------------------- b16 sizes
@pytest.fixture(scope="module")
def b16_model():
    """The paper's model built on the meta device: real shapes and parameter counts, no memory, no init."""
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    with torch.device("meta"):
        clip = open_clip.CLIP(**open_clip.get_model_config("ViT-B-16-quickgelu"))
        sampler = VxLSampler(clip, tokenizer)
        model = PuXIM(encoder=preset_encoder("b16"), interaction=InteractionHead(**B16_INTERACTION),
                      sampler=sampler)
    return model


def test_b16_parameter_counts(b16_model):
    counts = model_summary(b16_model)
    print("\nb16 parameter counts:", {k: f"{v:,}" for k, v in counts.items()})
    assert counts["stem"] == 2_147_520
    assert counts["encoder"] == 85_798_656 + 2_147_520  # timm ViT-B/16 without head + stem
    assert 149_000_000 < counts["sampler_frozen"] < 150_000_000  # CLIP ViT-B/16 (both towers), frozen
    # decoder layer: 2 x attention (4*768^2 + 4*768) + FFN (2*768*1024 + 1024 + 768) + 3 LayerNorms (6*768)
    layer = 2 * (4 * 768 * 768 + 4 * 768) + (2 * 768 * 1024 + 1024 + 768) + 6 * 768
    assert counts["interaction"] == 4 * layer + 768 * 2 + 2 == 25_217_538
    assert counts["trainable"] == counts["encoder"] + counts["interaction"]
    assert all(not p.requires_grad for p in b16_model.sampler.parameters())


def test_b16_forward_shapes(b16_model):
    meta = lambda: torch.empty(1, 3, 224, 224, device="meta")  # noqa: E731
    out = b16_model(dict(sketch=meta(), positive=meta(), negative=meta(),
                         positive_class=["cat"], negative_class=["dog"]))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"sketch_emb": (1, 768), "positive_emb": (1, 768), "negative_emb": (1, 768),
                      "photo_patch_tokens": (2, 196, 768), "photo_mask": (2, 196), "match_logits": (2, 2),
                      "match_labels": (2,)}
    assert tuple(b16_model.sampler.image_tokens(meta()).shape) == (1, 197, 512)


# ----------------------------------------------------------------------------- tiny forward
def test_forward_shapes_and_values(tiny_model):
    model = tiny_model.eval()
    batch = _batch()
    calls = []
    hook = model.encoder.register_forward_hook(lambda m, args, out: calls.append((args[0].shape[0], args[1])))
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        hook.remove()
    assert calls == [(B, "sketch"), (2 * B, "photo")]  # one sketch pass, one photo pass for pos + neg

    assert out["sketch_emb"].shape == (B, 192) and out["positive_emb"].shape == (B, 192)
    assert out["negative_emb"].shape == (B, 192) and out["photo_patch_tokens"].shape == (2 * B, 64, 192)
    assert out["photo_mask"].shape == (2 * B, 64) and out["match_logits"].shape == (2 * B, 2)
    assert out["match_labels"].tolist() == [1, 1, 0, 0] and out["match_labels"].dtype == torch.long
    assert out["photo_mask"].sum(dim=1).tolist() == [19.0] * 4  # keep 0.3 of 64: 64 - 45

    with torch.no_grad():
        photos = torch.cat([batch["positive"], batch["negative"]])
        tokens = model.encoder(photos, "photo")
        sketch_tokens = model.encoder(batch["sketch"], "sketch")
        mask = model.sampler(photos, ["cat", "dog", "car", "cup"])
        torch.testing.assert_close(out["photo_mask"], mask, rtol=0, atol=0)
        torch.testing.assert_close(out["sketch_emb"], model.encode(batch["sketch"], "sketch"))
        torch.testing.assert_close(out["positive_emb"], tokens[:B, 0])
        torch.testing.assert_close(out["negative_emb"], model.encode(batch["negative"], "photo"))
        torch.testing.assert_close(out["photo_patch_tokens"], tokens[:, 1:])
        # memory = CLS + patch tokens times the mask; queries = the same sketch for (s,p) and (s,n)
        memory = torch.cat([tokens[:, :1], tokens[:, 1:] * mask[..., None]], dim=1)
        expected = model.interaction(sketch_tokens.repeat(2, 1, 1), memory)
        torch.testing.assert_close(out["match_logits"], expected)
        unmasked = model.interaction(sketch_tokens.repeat(2, 1, 1), tokens)
    assert not torch.allclose(expected, unmasked)

    model.mask_memory = False
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(batch)["match_logits"], unmasked)
    finally:
        model.mask_memory = True


def test_precomputed_mask_skips_the_sampler(tiny_model):
    model = tiny_model.eval()
    batch = _batch()
    given = torch.zeros(2 * B, 64)
    given[:, :5] = 1
    batch["photo_mask"] = given
    original = model.sampler.forward
    model.sampler.forward = lambda *a, **k: pytest.fail("sampler called despite batch['photo_mask']")
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        model.sampler.forward = original
    torch.testing.assert_close(out["photo_mask"], given)
    batch["photo_mask"] = torch.ones(B, 64)
    with pytest.raises(ValueError, match="photo_mask"):
        model(batch)


def test_non_mask_variant():
    model = build_model(tiny_config(variant="non-mask")).eval()
    assert model.sampler is None and not model.use_mask
    with torch.no_grad():
        out = model(_batch())
    assert torch.equal(out["photo_mask"], torch.ones(2 * B, 64))
    assert build_criterion(make_config("b16", variant="non-mask"))(out)["loss_rec"].item() == 0.0


def test_build_model_options(tmp_path):
    model = build_model(tiny_config(keep_ratio=0.5, prompt="a photo of {}", vxl_norm="channel",
                                        clip_input_norm="clip", separate_encoders=True, int_memory="unmasked",
                                        dropout=0.0))
    s = model.sampler
    assert (s.keep_ratio, s.prompt, s.feature_norm, s.input_norm, s.surgery_depth) == (
        0.5, "a photo of {}", "channel", "clip", 2)
    assert model.encoder.photo_vit is not None and not model.mask_memory
    # --dropout sets every dropout of the trained parts: encoder and interaction decoder
    assert model.encoder.vit.pos_drop.p == 0.0 and model.interaction.decoder.layers[0].dropout.p == 0.0
    with pytest.raises(ValueError, match="--clip_weights"):
        build_model(make_config("b16"))
    no_sampler = build_model(tiny_config(), with_sampler=False)
    assert no_sampler.sampler is None and no_sampler.use_mask
    with pytest.raises(RuntimeError, match="photo_mask"):
        no_sampler(_batch())
    with pytest.raises(ConfigError, match="arch"):
        build_model(make_config("l14"))
    with pytest.raises(ConfigError, match="int_memory"):
        build_model(tiny_config(int_memory="half"))


# ----------------------------------------------------------------------------- training behaviour
def test_train_mode_and_trainable_parameters(tiny_model):
    model = tiny_model.train()
    assert model.encoder.training and model.interaction.training
    assert not model.sampler.training and not any(m.training for m in model.sampler.modules())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.sampler.parameters()}
    assert trainable == {id(p) for p in model.encoder.parameters()} | {id(p) for p in model.interaction.parameters()}
    model.eval()


@pytest.mark.parametrize("term", ["loss_tri", "loss_rec", "loss_int"])
def test_gradients_reach_the_encoder_never_clip(tiny_model, term):
    model = tiny_model.train()
    model.zero_grad(set_to_none=True)
    out = model(_batch())
    losses = build_criterion(make_config("b16"))(out)
    losses[term].backward()
    vit = model.encoder.vit
    for p in (vit.blocks[0].attn.qkv.weight, vit.patch_embed.stem[0].weight, vit.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    interaction_grads = [p.grad for p in model.interaction.parameters()]
    if term == "loss_int":
        assert all(g is not None for g in interaction_grads)
    else:
        assert all(g is None for g in interaction_grads)
    assert all(p.grad is None for p in model.sampler.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


# ----------------------------------------------------------------------------- interaction head
def test_interaction_head_structure():
    head = InteractionHead(**B16_INTERACTION)
    layers = head.decoder.layers
    assert len(layers) == 4 and head.classifier.out_features == 2
    layer = layers[0]
    assert layer.self_attn.batch_first and layer.multihead_attn.batch_first and not layer.norm_first
    assert layer.self_attn.num_heads == 4 and layer.linear1.out_features == 1024
    assert layer.activation is torch.nn.functional.relu and layer.dropout.p == 0.1


def test_interaction_head_is_per_sample():
    torch.manual_seed(0)
    head = InteractionHead(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.1).eval()
    s, p = torch.randn(5, 7, 32), torch.randn(5, 9, 32)
    with torch.no_grad():
        out = head(s, p)
        perm = torch.tensor([3, 0, 4, 1, 2])
        torch.testing.assert_close(head(s[perm], p[perm]), out[perm])  # permuting the batch permutes outputs
        s2, p2 = s.clone(), p.clone()
        s2[1:] = torch.randn(4, 7, 32)
        p2[1:] = torch.randn(4, 9, 32)
        torch.testing.assert_close(head(s2, p2)[0], out[0])  # sample 0 ignores the others
        torch.testing.assert_close(head(s[:1], p[:1]), out[:1])
        # per-token logits averaged over the query tokens
        torch.testing.assert_close(out, head.classifier(head.decoder(s, p)).mean(dim=1))


# ----------------------------------------------------------------------------- torch.compile
def test_compile_model_keeps_names_and_values():
    import copy

    from models import compile_model

    torch.manual_seed(0)
    eager = build_model(tiny_config(dropout=0.0)).train()
    compiled = compile_model(copy.deepcopy(eager), backend="eager")  # dynamo traces; no C++ build in tests
    # In place: parameter names and the state dict are the uncompiled model's (checkpoints stay portable).
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    assert compiled.encoder._compiled_call_impl is not None and compiled.interaction._compiled_call_impl is not None
    batch = _batch()
    out_e, out_c = eager(batch), compiled(batch)
    for key in out_e:
        torch.testing.assert_close(out_c[key], out_e[key])
    torch.testing.assert_close(compiled.encode(batch["sketch"], "sketch"), eager.encode(batch["sketch"], "sketch"))
    # Gradients flow through the compiled call like through the eager one.
    out_c["sketch_emb"].sum().backward()
    out_e["sketch_emb"].sum().backward()
    g_c = compiled.encoder.vit.blocks[0].attn.qkv.weight.grad
    g_e = eager.encoder.vit.blocks[0].attn.qkv.weight.grad
    torch.testing.assert_close(g_c, g_e)


# ----------------------------------------------------------------------------- seen-class head (tiny preset)
def test_seen_class_head_by_hand():
    from models import SeenClassHead

    head = SeenClassHead(embed_dim=2, num_classes=3, scale=16.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, -1.0]]))
    logits = head(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    # cosines: (1, 0, -1/sqrt2) and (1/sqrt2, 1/sqrt2, -1), times 16
    r = 16 / 2 ** 0.5
    torch.testing.assert_close(logits, torch.tensor([[16.0, 0.0, -r], [r, r, -16.0]]))
    with pytest.raises(ValueError, match="2 classes"):
        SeenClassHead(embed_dim=2, num_classes=1)


def test_class_head_outputs_and_loss():
    torch.manual_seed(0)
    args = tiny_config(variant="non-mask", w_cls=1.0, num_seen_classes=5)
    model = build_model(args).train()
    assert model.class_head is not None and model.class_head.weight.shape == (5, 192)
    assert {id(p) for p in model.class_head.parameters()} <= {id(p) for p in model.trainable_parameters()}
    batch = dict(_batch(), positive_label=torch.tensor([0, 3]), negative_label=torch.tensor([4, 1]))
    out = model(batch)
    assert out["class_logits"].shape == (3 * B, 5)
    assert out["class_labels"].tolist() == [0, 3, 0, 3, 4, 1]  # sketch, positive, negative
    embeddings = torch.cat([out["sketch_emb"], out["positive_emb"], out["negative_emb"]])
    torch.testing.assert_close(out["class_logits"], model.class_head(embeddings))

    crit = build_criterion(args)
    assert crit.weight_dict["loss_cls"] == 1.0 and crit.triplet.distance == "cosine"
    losses = crit(out)
    expected = torch.nn.functional.cross_entropy(out["class_logits"], out["class_labels"])
    torch.testing.assert_close(losses["loss_cls"], expected)
    torch.testing.assert_close(losses["loss"], losses["loss_tri"] + 0.1 * losses["loss_int"] + expected)
    losses["loss_cls"].backward()
    assert model.class_head.weight.grad.abs().sum() > 0
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="positive_label"):
        model(_batch())
    # No class count (a model built only to embed or to draw masks): no head, and the loss says what is missing.
    headless = build_model(tiny_config(variant="non-mask", w_cls=1.0), with_sampler=False)
    assert type(headless) is PuXIM and not hasattr(headless, "class_head")
    with pytest.raises(ValueError, match="class_logits"):
        crit(headless(batch))
    assert type(build_model(tiny_config(w_cls=0.0, num_seen_classes=5), with_sampler=False)) is PuXIM


def test_pseudo_sketches_are_encoded_as_sketches_and_trained_by_the_instance_loss():
    from models import PuXIMWithPseudoSketches

    args = tiny_config(variant="non-mask", w_inst=1.0, pseudo_sketch=True)
    torch.manual_seed(0)
    model = build_model(args, with_sampler=False).eval()
    torch.manual_seed(0)
    paper = build_model(tiny_config(variant="non-mask"), with_sampler=False).eval()  # same weights
    assert type(model) is PuXIMWithPseudoSketches and type(paper) is PuXIM
    batch = _batch()
    pseudo = _batch(seed=1)["sketch"]  # [B, 3, 64, 64]
    calls = []
    hook = model.encoder.register_forward_hook(lambda m, args, out: calls.append((args[0].shape[0], args[1])))
    try:
        with torch.no_grad():
            out = model(dict(batch, pseudo_sketch=pseudo))
    finally:
        hook.remove()
    assert calls == [(2 * B, "sketch"), (2 * B, "photo")]  # sketches and pseudo-sketches in one call
    with torch.no_grad():
        plain = paper(dict(batch, pseudo_sketch=pseudo))  # the paper's model encodes the sketches only
        alone = model.encoder(pseudo, "sketch")[:, 0]  # [B, D]
    assert "pseudo_sketch_emb" not in plain
    torch.testing.assert_close(out["pseudo_sketch_emb"], alone)  # the sketch path (eval: batch-independent)
    for key in plain:
        torch.testing.assert_close(out[key], plain[key])
    with pytest.raises(ValueError, match=r"batch\['pseudo_sketch'\]"):
        model(batch)
    model.train()
    losses = build_criterion(args)(model(dict(batch, pseudo_sketch=pseudo)))
    assert losses["loss_inst"] > 0
    losses["loss_inst"].backward()
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pseudo_sketch"):  # the loss without a model that encodes them
        build_criterion(args)(paper(batch))


def test_build_model_picks_the_paper_class_unless_the_run_has_a_training_aid():
    from models import PuXIMWithSeenClassHead, PuXIMWithTrainingAids

    def model_class(**fields):
        return type(build_model(tiny_config(**fields), with_sampler=False))

    assert model_class() is PuXIM and model_class(pseudo_sketch=False) is PuXIM
    assert model_class(w_inst=1.0, pseudo_sketch=False) is PuXIM  # a loss weight alone encodes nothing more
    assert model_class(w_cls=1.0, num_seen_classes=4) is PuXIMWithSeenClassHead
    aided = build_model(tiny_config(pseudo_sketch=True, w_cls=1.0, num_seen_classes=4))
    assert type(aided) is PuXIMWithTrainingAids and aided.class_head.weight.shape == (4, 192)
    # Aids without parameters leave the state dict as it is: checkpoints load whichever class reads them.
    plain = build_model(tiny_config(w_cls=1.0, num_seen_classes=4))
    assert list(aided.state_dict()) == list(plain.state_dict())
    assert {id(p) for p in aided.class_head.parameters()} <= {id(p) for p in aided.trainable_parameters()}
    batch = dict(_batch(), pseudo_sketch=_batch(seed=1)["sketch"], positive_label=[0, 1], negative_label=[2, 3])
    with torch.no_grad():
        out = aided.eval()(batch)
    assert {"pseudo_sketch_emb", "class_logits", "class_labels"} <= set(out)
