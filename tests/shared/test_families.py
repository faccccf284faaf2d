"""Every CLIP family (one small random-init instance each, built offline from its open_clip config
or a small transformers config): encoding parity with the library, batch == single, the traced
pooling step, Grad-ECLIP against a plain-autograd computation, SEARLE's injection, a NegAlign and a
TiPAI dense pass; refusals that name the family and what to use instead."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from family_fixtures import (
    AVERAGE_POOLED,
    FAMILIES,
    UNTRACED_TEXT,
    family_backbone,
    library_image_features,
    library_text_features,
    plain_image_maps,
    plain_text_scores,
)

from xclip.backbones import UnsupportedFamily, wrap_model
from xclip.explain import GAME, GradCAM, GradECLIP

TEXTS = ["a photo of a red circle", "two blue squares on water"]
ATTENTION_FAMILIES = [f for f in FAMILIES if f not in AVERAGE_POOLED]
TEXT_MAP_FAMILIES = [f for f in FAMILIES if f not in UNTRACED_TEXT]


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def images_for(bb, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)


# ---- loading and encoding ----------------------------------------------------------------------
def test_encoders_equal_the_library_and_batch_equals_single(family):
    bb = family_backbone(family)
    images, tokens = images_for(bb, 3), bb.tokenize(TEXTS)
    with torch.no_grad():
        image_emb, text_emb = bb.encode_image(images), bb.encode_text(tokens)
        torch.testing.assert_close(image_emb, library_image_features(bb, images), atol=1e-5, rtol=0)
        torch.testing.assert_close(text_emb, library_text_features(bb, tokens), atol=1e-5, rtol=0)
        single_image = torch.cat([bb.encode_image(images[i : i + 1]) for i in range(3)])
        single_text = torch.cat([bb.encode_text(tokens[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(single_image, image_emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(single_text, text_emb, atol=1e-5, rtol=0)
    assert image_emb.shape == (3, bb.embed_dim) and text_emb.shape == (2, bb.embed_dim)


def test_traced_forward_pools_like_the_model(family):
    bb = family_backbone(family)
    images = images_for(bb)
    with torch.no_grad():
        expected = library_image_features(bb, images)
        trace = bb.trace_image(images, n_blocks=1)
        torch.testing.assert_close(trace.embedding, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(trace.pool.forward(trace.pool.tokens), expected, atol=1e-5, rtol=0)
        attention = trace.pool.attention
        if family in AVERAGE_POOLED:
            assert attention is None
        else:  # the read-out through the tail is the embedding; probabilities are a distribution
            torch.testing.assert_close(attention.tail(attention.attn_out), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(attention.probs.sum(-1), torch.ones(attention.probs.shape[:2]))
        dense = bb.patch_features(trace)
        gh, gw = trace.grid
        assert trace.patch_tokens.shape[1] == gh * gw and dense.shape == (2, gh * gw, bb.embed_dim)
        text_trace = bb.trace_text(TEXTS, n_blocks=0)
        torch.testing.assert_close(text_trace.embedding, bb.encode_text(TEXTS), atol=1e-5, rtol=0)


def test_region_of_every_cell_is_the_pooled_embedding(family):
    """The whole grid as a region is the model's own pooling (average: the mean; attention: the
    read-out over all grid keys, which for towers without prefix keys is the embedding itself)."""
    bb = family_backbone(family)
    images = images_for(bb)
    with torch.no_grad():
        trace = bb.trace_image(images, n_blocks=1)
        everything = bb.region_embedding(trace, torch.ones(2, trace.patch_tokens.shape[1]))
        prefix = trace.pool.attention.prefix if trace.pool.attention is not None else 0
        if bb.vision.pooling in ("average", "latent query") and prefix == 0:
            torch.testing.assert_close(everything, trace.embedding, atol=1e-5, rtol=0)
        assert torch.isfinite(everything).all() and everything.shape == (2, bb.embed_dim)


# ---- explainers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_grad_eclip_image_maps_equal_plain_autograd(family):
    bb = family_backbone(family)
    images = images_for(bb)
    text_emb = bb.encode_text(TEXTS).detach()
    maps = GradECLIP(bb).image_maps(images, TEXTS)
    torch.testing.assert_close(maps, plain_image_maps(bb, images, text_emb), atol=1e-5, rtol=1e-4)
    assert maps.shape == (2, 2, *bb.trace_image(images, 1).grid)
    # pair maps are the diagonal, in one backward
    torch.testing.assert_close(GradECLIP(bb).pair_maps(images, TEXTS), maps.diagonal().permute(2, 0, 1))


@pytest.mark.parametrize("family", TEXT_MAP_FAMILIES)
def test_grad_eclip_text_maps_equal_plain_autograd(family):
    bb = family_backbone(family)
    images = images_for(bb)
    with torch.no_grad():
        image_emb = bb.encode_image(images)
    maps = GradECLIP(bb).text_maps(images, TEXTS)
    expected = plain_text_scores(bb, image_emb, TEXTS)
    for n in range(2):
        for k, _text in enumerate(TEXTS):
            length = expected[n][k].shape[0]
            assert len(maps.tokens[k]) == length
            torch.testing.assert_close(maps.token_scores[n, k, :length], expected[n][k], atol=1e-5, rtol=1e-4)


def test_grad_cam_weighs_what_the_pooling_step_reads(family):
    """Grad-CAM by the book on `PoolTrace.tokens`: weights = mean gradient of the cosine over the
    grid tokens, map = ReLU(sum_c w_c A_c)."""
    bb = family_backbone(family)
    images, text_emb = images_for(bb), bb.encode_text(TEXTS).detach()
    maps = GradCAM(bb).image_maps(images, TEXTS)
    with torch.no_grad():
        trace = bb.trace_image(images, n_blocks=1)
    pool = trace.pool  # its forward takes the trace's batch (class-token residuals are per image)
    for k in range(2):
        acts = pool.tokens.detach().requires_grad_(True)
        with torch.enable_grad():
            target = F.cosine_similarity(pool.forward(acts), text_emb[k : k + 1]).sum()  # images are independent
            (grad,) = torch.autograd.grad(target, acts)
        for n in range(2):
            a, g = acts[n, pool.prefix :].detach(), grad[n, pool.prefix :]
            expected = (a @ g.mean(0)).clamp_min(0).view(trace.grid)
            torch.testing.assert_close(maps[n, k], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_game_runs_on_the_pooling_attention(family):
    bb = family_backbone(family)
    images = images_for(bb)
    last = GAME(bb).image_maps(images, TEXTS)
    assert torch.isfinite(last).all() and (last >= 0).all()
    if bb.vision.pooling != "class token":
        # GAME's last layer is the pool's row: (grad * attn)+ averaged over heads, on the grid keys
        with torch.enable_grad():
            trace = bb.trace_image(images[:1], n_blocks=0)
            att = trace.pool.attention
            probs = att.probs.detach().requires_grad_(True)
            emb = att.tail(torch.einsum("nhl,nhld->nhd", probs, att.v.detach()).flatten(1))
            target = F.cosine_similarity(emb, bb.encode_text(TEXTS[:1]).detach())[0]
            (g,) = torch.autograd.grad(target, probs)
        expected = (g * probs).clamp_min(0).mean(1)[0, att.prefix :].view(trace.grid)
        torch.testing.assert_close(last[0, 0], expected.detach(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(AVERAGE_POOLED))
def test_families_without_an_attention_pool_refuse_with_the_alternative(family):
    bb = family_backbone(family)
    images = images_for(bb)
    for explainer in (GradECLIP(bb), GAME(bb)):
        with pytest.raises(UnsupportedFamily) as err:
            explainer.image_maps(images, TEXTS)
        assert bb.vision.family in str(err.value) and "GradCAM(backbone)" in str(err.value)


@pytest.mark.parametrize("family", sorted(UNTRACED_TEXT))
def test_text_towers_without_traced_blocks_refuse_text_maps(family):
    bb = family_backbone(family)
    with pytest.raises(UnsupportedFamily) as err:
        GradECLIP(bb).text_maps(images_for(bb), TEXTS)
    assert bb.text.family in str(err.value) and "SHAP/Captum" in str(err.value)


def test_grad_eclip_reference_mode_is_openai_clip_only():
    with pytest.raises(UnsupportedFamily, match="SigLIP/PE-style ViT.*use mode='model'"):
        GradECLIP(family_backbone("siglip"), mode="reference").image_maps(images_for(family_backbone("siglip")), TEXTS)


def test_siglip_read_out_gradient_equals_the_library_forward():
    """timm's own AttentionPoolLatent forward, its read-out captured before `proj` by a hook: the
    gradient of the cosine there equals the one Grad-ECLIP takes through xclip's tail."""
    bb = family_backbone("siglip")
    images, text_emb = images_for(bb), bb.encode_text(TEXTS[:1]).detach()
    pool = bb.model.visual.trunk.attn_pool
    captured = {}

    def leaf(module, args):
        captured["o"] = args[0].detach().requires_grad_(True)
        return (captured["o"],)

    handle = pool.proj.register_forward_pre_hook(leaf)
    try:
        with torch.enable_grad():
            target = F.cosine_similarity(bb.model.encode_image(images), text_emb).sum()
            (library_grad,) = torch.autograd.grad(target, captured["o"])
    finally:
        handle.remove()
    attention = bb.trace_image(images, n_blocks=0).pool.attention
    read_out = attention.attn_out.detach().requires_grad_(True)
    with torch.enable_grad():
        (ours,) = torch.autograd.grad(F.cosine_similarity(attention.tail(read_out), text_emb).sum(), read_out)
    torch.testing.assert_close(ours, library_grad[:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(read_out, captured["o"][:, 0].detach(), atol=1e-6, rtol=1e-5)


# ---- workflows -----------------------------------------------------------------------------------
def test_searle_injection_of_the_words_own_embedding_is_the_plain_encoder(family):
    bb = family_backbone(family)
    slot, word = bb.tokenize(["a photo of $"]), bb.tokenize(["a photo of cat"])
    position = int((slot[0] == bb.placeholder_id).nonzero()[0])
    pseudo = bb.token_embedding(word)[:, position].detach()
    with torch.no_grad():
        injected = bb.encode_text_from_embeddings(bb.token_embedding(slot), slot, pseudo)
        torch.testing.assert_close(injected, bb.encode_text(word), atol=1e-5, rtol=0)


def test_negalign_and_tipai_dense_run_with_finite_numbers(family):
    from xclip.faithfulness.scoring import TiPAIScorer
    from xclip.ood.negalign_features import NegAlignFeatures

    bb = family_backbone(family)
    images01 = torch.rand(2, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(3))
    id_emb = bb.encode_texts(["circle", "square", "star"]).detach()
    feats = NegAlignFeatures(bb)(bb.normalize(images01), id_emb)
    for name in ("image_emb", "bg_emb", "cam"):
        assert torch.isfinite(getattr(feats, name)).all(), name
    scorer = TiPAIScorer(bb, grid=2, methods=("dense",))
    scores = scorer.score(images01, scorer.text_embeddings(TEXTS))
    assert torch.isfinite(scores.global_score).all()
    assert {k: tuple(v.shape) for k, v in scores.maps.items()} == {"dense": (2, 2, 2), "dense_gradeclip": (2, 2, 2)}
    assert all(torch.isfinite(v).all() for v in scores.maps.values())


def test_siglip_probabilities_are_the_sigmoid_with_its_bias():
    bb = family_backbone("siglip")
    image_emb, text_emb = torch.randn(3, bb.embed_dim), torch.randn(2, bb.embed_dim)
    cos = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    scale, bias = bb.model.logit_scale.exp(), bb.model.logit_bias
    torch.testing.assert_close(bb.probabilities(image_emb, text_emb), torch.sigmoid(scale * cos + bias))
    clip = family_backbone("openai-vit")
    torch.testing.assert_close(
        clip.probabilities(image_emb[:, :32], text_emb[:, :32]),
        (
            clip.model.logit_scale.exp()
            * (F.normalize(image_emb[:, :32], dim=-1) @ F.normalize(text_emb[:, :32], dim=-1).T)
        ).softmax(-1),
    )


def test_probability_target_explains_the_models_own_probability():
    bb = family_backbone("siglip")
    images = images_for(bb)
    maps = GradECLIP(bb).image_maps(images, TEXTS, target="probability")
    by_callable = GradECLIP(bb).image_maps(images, TEXTS, target=bb.probabilities)
    torch.testing.assert_close(maps, by_callable)
    assert not torch.allclose(maps, GradECLIP(bb).image_maps(images, TEXTS))


# ---- tokenizers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["openai-vit", "siglip", "clipa", "hf-clip"])
def test_texts_longer_than_the_context_warn_once_with_counts(family, caplog):
    bb = family_backbone(family)
    long = " ".join(["red circle"] * 60)
    with caplog.at_level(logging.WARNING, logger="xclip.backbones"):
        tokens = bb.tokenize([long, "a red circle", long + " on water"])
    records = [r for r in caplog.records if "context" in r.getMessage()]
    assert len(records) == 1
    expected_longest = max(bb.tokenizer.token_counts([long + " on water"]))
    assert expected_longest > bb.context_length
    assert (
        f"2 of 3 texts are longer than the text tower's context of {bb.context_length} tokens"
        in records[0].getMessage()
        and f"the longest has {expected_longest} tokens" in records[0].getMessage()
    )
    assert tokens.shape == (3, bb.context_length)
    caplog.clear()
    bb.tokenize(["a red circle"])
    assert not [r for r in caplog.records if "context" in r.getMessage()]


def test_wrap_model_names_what_to_pass_for_a_tokenizer_that_needs_a_download():
    from xclip.backbones.reduced import reduced_openclip

    with pytest.raises(ValueError, match="pass tokenizer="):
        wrap_model(reduced_openclip("ViT-B-16-SigLIP"))


def test_distill_towers_take_siglip_towers():
    """SigLIP's towers as Teacher/Student towers: the text tower runs from token embeddings (SHAP /
    Captum) exactly as from ids, with the padding mask."""
    from xclip.distill.towers import TextTower, VisionTower

    torch.manual_seed(0)
    text = TextTower(
        {
            "model_type": "siglip_text_model",
            "vocab_size": 100,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        pooling="mean",
    ).eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        by_ids, by_embeds = text(ids, mask), text.forward_embeds(text.embed(ids), mask)
    torch.testing.assert_close(by_embeds.pooled, by_ids.pooled, atol=1e-6, rtol=0)
    vision = VisionTower(
        {
            "model_type": "siglip_vision_model",
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    ).eval()
    with torch.no_grad():
        pooled = vision(vision.pixel_values(torch.rand(2, 3, 32, 32))).pooled
    assert pooled.shape == (2, vision.feature_size)


@pytest.mark.parametrize("family", ["siglip", "coca", "roberta-text", "hf-siglip2"])
def test_cir_queries_keep_the_padding_where_the_tower_reads_it(family):
    """CIR's prompts are trimmed after EOT only for causal EOT-pooled towers; SigLIP (last position),
    CoCa (appended class token) and mean-pooled HF encoders encode the full padded row."""
    from xclip.cir.query import encode_plain, encode_with_pseudo_tokens

    bb = family_backbone(family)
    slot, word = bb.tokenize(["a photo of $"]), bb.tokenize(["a photo of cat"])
    pseudo = bb.token_embedding(word)[:, int((slot[0] == bb.placeholder_id).nonzero()[0])].detach()
    with torch.no_grad():
        plain = bb.encode_text(["a photo of cat"])
        torch.testing.assert_close(encode_with_pseudo_tokens(bb, ["a photo of $"], pseudo), plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(encode_plain(bb, ["a photo of cat"]), plain, atol=1e-5, rtol=0)
