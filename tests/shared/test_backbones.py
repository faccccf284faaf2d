"""xclip.backbones on tiny offline models: open_clip batch-first, open_clip sequence-first, HF."""

from __future__ import annotations

import json
import logging
import socket
import time

import numpy as np
import open_clip
import pytest
import torch
from huggingface_hub import constants as hf_constants
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors import safe_open
from tiny_models import MODEL_CFG, TEXT_CFG, VISION_CFG, clip_hf_tokenizer, sequence_first_twin, tiny_clip, tiny_hf_clip

from xclip.backbones import (
    OfflineWeightsError,
    checkpoints_dir,
    load_backbone,
    load_checkpoint,
    save_checkpoint,
    wrap_model,
)
from xclip.backbones.base import resize_position_embedding
from xclip.backbones.hf import HFTokenizerAdapter

TINY_ARCH = "xclip-test-tiny"
TEXTS = ["a photo of a cat", "a red square on water", "two blue circles"]
KINDS = ["openclip_bf", "openclip_sf", "hf"]


@pytest.fixture(scope="module")
def oc_model() -> CLIP:
    return tiny_clip()


@pytest.fixture(scope="module")
def backbones(oc_model):
    return {
        "openclip_bf": wrap_model(oc_model),
        "openclip_sf": wrap_model(sequence_first_twin(oc_model)),
        "hf": wrap_model(tiny_hf_clip()),
    }


@pytest.fixture(params=KINDS)
def bb(request, backbones):
    return backbones[request.param]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """Register a tiny open_clip architecture so spec strings can build it offline."""
    d = tmp_path_factory.mktemp("model_configs")
    (d / f"{TINY_ARCH}.json").write_text(json.dumps(MODEL_CFG))
    open_clip.add_model_config(d)
    return TINY_ARCH


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No cached weights anywhere: empty HF hub cache and an empty ~/.cache/clip."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("HF_HUB_OFFLINE", "XCLIP_OFFLINE", "XCLIP_PROBE_HOST", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def fake_hub_snapshot(hub_cache, repo: str):
    """Create the directory layout of a cached hub repo (refs/main -> snapshots/<commit>/)."""
    commit = "0" * 40
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- encoders ------------------------------------------------------------------------------
def test_encoders_equal_library(backbones, oc_model, images):
    tokens = backbones["openclip_bf"].tokenize(TEXTS)
    with torch.no_grad():
        for kind in ("openclip_bf", "openclip_sf"):
            model = backbones[kind].model
            assert torch.equal(backbones[kind].encode_image(images), model.encode_image(images))
            assert torch.equal(backbones[kind].encode_text(tokens), model.encode_text(tokens))
        hf = backbones["hf"]
        assert torch.equal(hf.encode_image(images), hf.model.get_image_features(pixel_values=images).pooler_output)
        assert torch.equal(hf.encode_text(tokens), hf.model.get_text_features(input_ids=tokens).pooler_output)
        assert torch.equal(hf.encode_text(TEXTS), hf.encode_text(tokens))
        unit = hf.encode_text(TEXTS, normalize=True).norm(dim=-1)
    torch.testing.assert_close(unit, torch.ones(3))


def test_sequence_first_twin_matches_batch_first(backbones, images):
    bf, sf = backbones["openclip_bf"], backbones["openclip_sf"]
    assert sf.model.visual.transformer.resblocks[0].attn.batch_first is False
    assert bf.model.visual.transformer.resblocks[0].attn.batch_first is True
    with torch.no_grad():
        torch.testing.assert_close(sf.encode_image(images), bf.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(sf.encode_text(TEXTS), bf.encode_text(TEXTS), atol=1e-5, rtol=0)
    for t_bf, t_sf in (
        (bf.trace_text(TEXTS, 2), sf.trace_text(TEXTS, 2)),
        (bf.trace_image(images, 2), sf.trace_image(images, 2)),
    ):
        torch.testing.assert_close(t_sf.blocks[0].x_in, t_bf.blocks[0].x_in, atol=1e-5, rtol=0)
        torch.testing.assert_close(t_sf.embedding, t_bf.embedding, atol=1e-5, rtol=0)


def test_properties(bb):
    assert (bb.image_size, bb.patch_size, bb.grid_size, bb.embed_dim, bb.context_length) == (32, 8, (4, 4), 32, 16)
    assert (bb.sot_id, bb.eot_id) == (49406, 49407)
    assert bb.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert torch.equal(bb.logit_scale, bb.model.logit_scale.exp())
    assert bb.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-3)  # both libraries init to 1/0.07


# ---- traced forward ------------------------------------------------------------------------
@pytest.mark.parametrize("n_blocks", [1, 2])
def test_trace_reproduces_encoders(bb, images, n_blocks):
    image_trace = bb.trace_image(images, n_blocks=n_blocks)
    text_trace = bb.trace_text(TEXTS, n_blocks=8)  # capped at the tower depth
    assert len(image_trace.blocks) == n_blocks
    assert len(text_trace.blocks) == len(bb.text_blocks())
    with torch.no_grad():
        torch.testing.assert_close(image_trace.embedding, bb.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(text_trace.embedding, bb.encode_text(TEXTS), atol=1e-5, rtol=0)
        dense = bb.dense_image_features(images)
    assert image_trace.patch_tokens.shape == (2, 16, 64)
    assert dense.shape == (2, 16, 32)
    torch.testing.assert_close(dense, bb.image_head(image_trace.patch_tokens), atol=1e-5, rtol=0)
    assert text_trace.eot_index.tolist() == [6, 6, 4]  # "<sot> two blue circles <eot>" -> 4


def test_trace_tensors_consistent(bb, images):
    trace = bb.trace_image(images, n_blocks=2)
    views = bb.vision_blocks()[-2:]
    n, length, width, heads = 2, 17, 64, 4
    for view, block in zip(views, trace.blocks):
        for t in (block.x_in, block.q, block.k, block.v, block.attn_out, block.x_out):
            assert t.shape == (n, length, width)
        for flat, per_head in ((block.q, block.q_heads), (block.k, block.k_heads), (block.v, block.v_heads)):
            assert per_head.shape == (n, heads, length, width // heads)
            assert torch.equal(per_head, flat.view(n, length, heads, -1).transpose(1, 2))
        q, k, v = view.qkv(view.ln_1(block.x_in))
        assert torch.equal(q, block.q) and torch.equal(k, block.k) and torch.equal(v, block.v)
        assert block.attn_weights.shape == (n, heads, length, length)
        torch.testing.assert_close(block.attn_weights.sum(-1), torch.ones(n, heads, length))
        mixed = (block.attn_weights @ block.v_heads).transpose(1, 2).reshape(n, length, width)
        torch.testing.assert_close(block.attn_out, mixed)
    assert trace.blocks[1].x_in is trace.blocks[0].x_out
    torch.testing.assert_close(trace.patch_tokens, trace.blocks[-1].x_out[:, 1:])


def test_text_trace_is_causal(bb):
    tokens = bb.tokenize(["a photo of a big cat"])
    changed = tokens.clone()
    changed[0, 5] = bb.tokenize(["dog"])[0, 1]
    a, b = bb.trace_text(tokens, n_blocks=3), bb.trace_text(changed, n_blocks=3)
    upper = torch.ones(16, 16, dtype=torch.bool).triu(1)
    for block_a, block_b in zip(a.blocks, b.blocks):
        assert torch.all(block_a.attn_weights[..., upper] == 0)
        torch.testing.assert_close(block_a.x_out[:, :5], block_b.x_out[:, :5], atol=1e-6, rtol=0)
        assert (block_a.x_out[:, 5] - block_b.x_out[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("frozen", [False, True])
def test_gradient_reaches_attn_out(bb, images, frozen):
    params = list(bb.parameters())
    try:
        for p in params:
            p.requires_grad_(not frozen)
        trace = bb.trace_image(images, n_blocks=1)
        (grad,) = torch.autograd.grad(trace.embedding.sum(), trace.blocks[-1].attn_out)
        text = bb.trace_text(TEXTS, n_blocks=2)
        (text_grad,) = torch.autograd.grad(text.embedding.sum(), text.blocks[0].x_in)
    finally:
        for p in params:
            p.requires_grad_(True)
    # Only the CLS row of the last block reaches the image embedding.
    assert grad[:, 0].abs().sum() > 0 and torch.all(grad[:, 1:] == 0)
    # Causality: tokens after EOT cannot influence the pooled text embedding.
    for row, eot in enumerate(text.eot_index.tolist()):
        assert text_grad[row, : eot + 1].abs().sum() > 0 and torch.all(text_grad[row, eot + 1 :] == 0)


# ---- token embeddings and pseudo-tokens ----------------------------------------------------
def test_encode_text_from_embeddings_and_pseudo_tokens(bb):
    with_slot = bb.tokenize(["a photo of $ that is red", "$ on water"])
    with_word = bb.tokenize(["a photo of cat that is red", "dog on water"])
    embeds = bb.token_embedding(with_slot)
    assert embeds.shape == (2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.encode_text_from_embeddings(embeds, with_slot), bb.encode_text(with_slot), atol=1e-6, rtol=0
        )
    slot = (with_slot == 259).int().argmax(1)
    assert slot.tolist() == [4, 1]
    word_embeds = bb.token_embedding(with_word)
    pseudo = word_embeds[torch.arange(2), slot].detach().requires_grad_(True)
    out = bb.encode_text_from_embeddings(embeds, with_slot, pseudo_tokens=pseudo)
    with torch.no_grad():
        torch.testing.assert_close(out, bb.encode_text(with_word), atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(out.sum(), pseudo)
    assert torch.all(grad.abs().sum(-1) > 0)


def test_pseudo_token_only_first_slot_and_missing_slot(bb):
    tokens = bb.tokenize(["$ and $", "no slot here"])
    embeds = bb.token_embedding(tokens)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        bb.encode_text_from_embeddings(embeds, tokens, pseudo_tokens=torch.zeros(2, 64))
    first = bb.tokenize(["$ and $"])
    pseudo = torch.randn(1, 64)
    manual = bb.token_embedding(first).clone()
    manual[0, 1] = pseudo[0]  # position 0 is <sot>; only the first '$' is replaced
    with torch.no_grad():
        torch.testing.assert_close(
            bb.encode_text_from_embeddings(bb.token_embedding(first), first, pseudo),
            bb.encode_text_from_embeddings(manual, first),
        )


# ---- tokenizer and preprocessing -----------------------------------------------------------
def test_encode_texts_in_batches_equals_one_forward(bb):
    texts = ["a red circle", "two blue squares", "a star on sand", "a heart", "a green cross"]
    whole = bb.encode_text(texts, normalize=True)
    torch.testing.assert_close(bb.encode_texts(texts, batch_size=2, normalize=True), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(bb.encode_texts(texts, batch_size=2), bb.encode_text(texts), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least one text"):
        bb.encode_texts([])
    with pytest.raises(ValueError, match="batch_size"):
        bb.encode_texts(texts, batch_size=0)


def test_tokenize_and_decode(bb):
    tokens = bb.tokenize(["a photo of $ that", "x " * 40])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    assert tokens[0, :7].tolist() == [49406, 320, 1125, 539, 259, 682, 49407]
    assert tokens[1, -1].item() == 49407  # truncated rows still end with EOT
    assert bb.decode_tokens(tokens[0, :7]) == ["<start_of_text>", "a", "photo", "of", "$", "that", "<end_of_text>"]


def test_hf_tokenizer_adapter_matches_clip_bpe(backbones):
    hf_tok = HFTokenizerAdapter(clip_hf_tokenizer(), 16)
    ours = backbones["hf"].tokenize(TEXTS)
    theirs = hf_tok(TEXTS)
    eot = ours.argmax(-1)
    for row, e in enumerate(eot.tolist()):
        assert theirs[row, : e + 1].tolist() == ours[row, : e + 1].tolist()
    assert hf_tok.decode_tokens(theirs[0, :6].tolist()) == ["<|startoftext|>", "a", "photo", "of", "a", "cat"]
    assert (hf_tok.sot_id, hf_tok.eot_id) == (49406, 49407)


def test_preprocess_and_normalize(bb):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    images01 = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    x = bb.preprocess(Image.fromarray(rgb))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, bb.normalize(images01)[0], atol=1e-5, rtol=0)
    grey = torch.full((2, 3, 64, 48), 0.5)
    mean, std = torch.tensor(bb.image_mean), torch.tensor(bb.image_std)
    expected = ((0.5 - mean) / std).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    torch.testing.assert_close(bb.normalize(grey), expected)


# ---- checkpoint format ---------------------------------------------------------------------
def test_save_load_checkpoint_roundtrip(oc_model, images, tmp_path, monkeypatch):
    path = tmp_path / "tiny-shapes"
    preprocess = {"image_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    save_checkpoint(oc_model, MODEL_CFG, preprocess, 16, path)
    (path / "README.md").write_text("model card")
    with pytest.raises(FileExistsError, match="already holds a model"):
        save_checkpoint(oc_model, MODEL_CFG, preprocess, 16, path)
    save_checkpoint(oc_model, MODEL_CFG, preprocess, 16, path, overwrite=True)  # replacing it on purpose
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-shapes"]  # no temp dirs left behind
    assert (path / "README.md").read_text() == "model card"  # a re-export keeps the model card
    config = json.loads((path / "config.json").read_text())
    assert config == {
        "architecture": "openclip",
        "format_version": 1,
        "model_cfg": json.loads(json.dumps(MODEL_CFG)),
        "preprocess": preprocess,
        "tokenizer": {"context_length": 16},
    }
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("visual.proj").dtype == torch.float16

    monkeypatch.setenv("XCLIP_CHECKPOINTS", str(tmp_path))
    for loaded in (load_checkpoint(path), load_backbone(str(path)), load_backbone("xclip:tiny-shapes")):
        assert not loaded.training
        assert next(loaded.parameters()).dtype == torch.float32
        assert loaded.model_cfg == config["model_cfg"]
        assert (loaded.image_mean, loaded.image_std) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        with torch.no_grad():
            for new, ref in (
                (loaded.encode_image(images), oc_model.encode_image(images)),
                (loaded.encode_text(TEXTS), oc_model.encode_text(loaded.tokenize(TEXTS))),
            ):
                assert ((new - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 1e-2


def test_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    monkeypatch.setenv("XCLIP_CHECKPOINTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_backbone("xclip:missing")


def test_checkpoints_dir_defaults_to_repo(monkeypatch):
    monkeypatch.delenv("XCLIP_CHECKPOINTS", raising=False)
    root = checkpoints_dir()
    assert root is not None and root.name == "checkpoints" and (root.parent / "src" / "xclip").is_dir()


# ---- spec strings --------------------------------------------------------------------------
def test_openclip_random_init_spec(tiny_arch, images):
    bb = load_backbone(f"openclip:{tiny_arch}")
    assert not bb.training and bb.embed_dim == 32 and bb.context_length == 16
    assert bb.model_cfg == MODEL_CFG
    with torch.no_grad():
        assert bb.encode_image(images).shape == (2, 32)


def test_openclip_tag_from_cache_forces_quick_gelu(tiny_arch, empty_caches, monkeypatch, caplog, images):
    """A cached tag trained with QuickGELU on an arch without it: fixed, warned, loaded offline."""
    source = tiny_clip(seed=3)
    snapshot = fake_hub_snapshot(empty_caches / "hub", "xclip-test/tiny-openai")
    torch.save(source.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    tag_cfg = {"hf_hub": "xclip-test/tiny-openai/", "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_arch, {"openai": tag_cfg})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with caplog.at_level(logging.WARNING):
        bb = load_backbone(f"openclip:{tiny_arch}/openai")
    assert "QuickGELU" in caplog.text
    assert isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert bb.model_cfg["quick_gelu"] is True
    assert bb.image_mean == (0.5, 0.5, 0.5)
    assert torch.equal(bb.model.visual.proj, source.visual.proj)

    local = load_backbone(f"openclip:{tiny_arch}/{snapshot / 'open_clip_pytorch_model.bin'}")
    assert torch.equal(local.model.token_embedding.weight, source.token_embedding.weight)


@pytest.mark.parametrize(
    "spec,names",
    [
        ("openclip:ViT-B-32-quickgelu/openai", ["openclip:ViT-B-32-quickgelu/openai", "hf download", "//path/to/"]),
        ("hf:openai/clip-vit-base-patch32", ["hf:openai/clip-vit-base-patch32", "hf download", "hf:/path/to/dir"]),
    ],
)
@pytest.mark.parametrize("network", ["offline_env", "closed_port"])
def test_missing_pretrained_weights_fail_fast(empty_caches, monkeypatch, spec, names, network):
    if network == "offline_env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("XCLIP_PROBE_HOST", f"127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(OfflineWeightsError) as err:
        load_backbone(spec)
    assert time.monotonic() - start < 5
    for name in names:
        assert name in str(err.value)
    assert str(empty_caches / "hub") in str(err.value)  # where the cache is expected


def test_bad_specs(tmp_path, tiny_arch):
    with pytest.raises(ValueError, match=r"open_clip\.list_models\(\)"):
        load_backbone("openclip:ViT-Q-99")
    with pytest.raises(ValueError, match="tags for ViT-B-32: .*openai"):
        load_backbone("openclip:ViT-B-32/no_such_tag")
    missing = tmp_path / "nope" / "weights.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_backbone(f"openclip:{tiny_arch}/{missing}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_backbone(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_backbone(f"hf:{tmp_path / 'absent'}")


def test_hf_local_directory(tmp_path, images):
    model = tiny_hf_clip(seed=5)
    model.save_pretrained(tmp_path / "with_tok")
    clip_hf_tokenizer().save_pretrained(tmp_path / "with_tok")
    model.save_pretrained(tmp_path / "no_tok")
    bb = load_backbone(f"hf:{tmp_path / 'with_tok'}")
    assert isinstance(bb.tokenizer, HFTokenizerAdapter)
    assert bb.model.config._attn_implementation == "eager"
    assert (
        load_backbone(str(tmp_path / "no_tok")).tokenize(TEXTS).tolist() == wrap_model(model).tokenize(TEXTS).tolist()
    )
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), model.get_image_features(pixel_values=images).pooler_output)
        expected = model.get_text_features(input_ids=bb.tokenize(TEXTS)).pooler_output
        torch.testing.assert_close(bb.encode_text(TEXTS), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["SiglipModel", "Siglip2Model"])
def test_hf_siglip_directories_load_with_their_tokenizer_and_siglip_normalisation(kind, tmp_path):
    from xclip.backbones.reduced import reduced_hf

    model, tokenizer = reduced_hf(kind, seed=2)
    model.save_pretrained(tmp_path / "siglip")
    tokenizer.save_pretrained(tmp_path / "siglip")
    bb = load_backbone(str(tmp_path / "siglip"))
    assert type(bb.model).__name__ == kind and bb.model.config._attn_implementation == "eager"
    assert bb.image_mean == (0.5, 0.5, 0.5) and bb.logit_bias is not None
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(tmp_path / "siglip")  # the directory's tokenizer, as transformers loads it
    assert bb.tokenize(TEXTS).tolist() == own(TEXTS, padding="max_length", max_length=16)["input_ids"]
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), wrap_model(model, tokenizer).encode_image(images))
    model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_backbone(str(tmp_path / "no_tok"))


def test_hf_hub_id_from_cache_loads_offline(empty_caches, monkeypatch):
    model = tiny_hf_clip(seed=6)
    snapshot = fake_hub_snapshot(empty_caches / "hub", "xclip-test/tiny-hf")
    model.save_pretrained(snapshot)
    clip_hf_tokenizer().save_pretrained(snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = load_backbone("hf:xclip-test/tiny-hf")
    assert isinstance(bb.tokenizer, HFTokenizerAdapter)
    assert torch.equal(bb.model.text_projection.weight, model.text_projection.weight)


# ---- unsupported variants ------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(vision_cfg={**VISION_CFG, "scaled_cosine_attn": True}), "scaled-cosine"),
        (dict(vision_cfg={**VISION_CFG, "qk_norm": True}), "qk-norm"),
        (dict(text_cfg={**TEXT_CFG, "scale_heads": True}), "per-head attention scaling"),
    ],
)
def test_unsupported_variants_rejected(overrides, message):
    with pytest.raises(NotImplementedError, match=message):
        wrap_model(tiny_clip(**overrides))


def test_wrap_rejects_foreign_models():
    with pytest.raises(TypeError, match="Linear"):
        wrap_model(torch.nn.Linear(2, 2))


def test_tokenize_rejects_single_string(backbones):
    with pytest.raises(TypeError, match="list of strings"):
        backbones["hf"].tokenize("a single string")


# ---- other input sizes (explanations at native resolution) ---------------------------------
def test_resize_position_embedding_identity_and_shape():
    pos = torch.randn(1 + 16, 8)
    assert resize_position_embedding(pos, (4, 4)) is pos
    out = resize_position_embedding(pos, (6, 10))
    assert out.shape == (1 + 60, 8)
    torch.testing.assert_close(out[0], pos[0])  # the class row is never interpolated
    flat = torch.ones(1 + 16, 8)  # a constant grid stays constant under bicubic interpolation
    torch.testing.assert_close(resize_position_embedding(flat, (6, 10)), torch.ones(61, 8))


def test_openclip_other_sizes_match_open_clip_resized_model(oc_model):
    # open_clip's own model built at 48x64, its position embeddings resized by open_clip's
    # resize_pos_embed without antialiasing (the official Grad-ECLIP/HF interpolation)
    big = CLIP(**{**MODEL_CFG, "vision_cfg": {**VISION_CFG, "image_size": (48, 64)}}).eval()
    state = dict(oc_model.state_dict())
    open_clip.model.resize_pos_embed(state, big, antialias=False)
    big.load_state_dict(state)
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    for model in (oc_model, sequence_first_twin(oc_model)):
        bb = wrap_model(model)
        assert bb.patch_grid(x) == (6, 8) and bb.grid_size == (4, 4)
        with torch.no_grad():
            expected = big.encode_image(x)
            torch.testing.assert_close(bb.encode_image(x), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(bb.trace_image(x, n_blocks=2).embedding, expected, atol=1e-5, rtol=0)


def test_hf_other_sizes_match_interpolate_pos_encoding(backbones):
    bb = backbones["hf"]
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = bb.model.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
        expected = out if isinstance(out, torch.Tensor) else out.pooler_output
        torch.testing.assert_close(bb.encode_image(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(bb.trace_image(x, n_blocks=1).embedding, expected, atol=1e-5, rtol=0)


def test_sizes_that_are_not_patch_multiples_fail_clearly(bb):
    with pytest.raises(ValueError, match=r"30x40 is not a multiple of the patch size 8.*32x40"):
        bb.encode_image(torch.zeros(1, 3, 30, 40))
    with pytest.raises(ValueError, match="not a multiple"):
        bb.trace_image(torch.zeros(1, 3, 32, 36))


def test_normalize_native_size(bb):
    images01 = torch.rand(2, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    native = bb.normalize(images01, size="native")
    assert native.shape == (2, 3, 48, 72)  # each side rounded to the nearest multiple of 8
    assert bb.normalize(images01, size=(40, 16)).shape == (2, 3, 40, 16)
    assert bb.normalize(torch.rand(1, 3, 3, 3), size="native").shape == (1, 3, 8, 8)  # at least one patch
    exact = torch.rand(1, 3, 24, 40)
    mean, std = torch.tensor(bb.image_mean).view(1, 3, 1, 1), torch.tensor(bb.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(bb.normalize(exact, size="native"), (exact - mean) / std)  # no resampling
    with pytest.raises(ValueError, match="size must be None, 'native' or"):
        bb.normalize(images01, size="big")


# ---- the backend registry ------------------------------------------------------------------------
def test_a_new_backend_is_one_registration(monkeypatch, oc_model):
    """A backend module registers its scheme, loader and the models it wraps; load_backbone and
    wrap_model find it with nothing else edited."""
    from xclip.backbones import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.backends()  # the shipped ones first

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = oc_model

    calls = []

    def wrap(model, tokenizer, preprocess_cfg):
        calls.append("wrap")
        return wrap_model(model.inner, tokenizer, preprocess_cfg)

    registry.register_backend(
        registry.Backend(
            scheme="toy",
            load=lambda ref: wrap(Toy(), None, None),
            describe="toy:<anything>",
            claims_model=lambda model: isinstance(model, Toy),
            wrap=wrap,
        )
    )
    bb = load_backbone("toy:whatever")
    assert bb.spec == "toy:whatever" and calls == ["wrap"]
    assert wrap_model(Toy()).model is oc_model and calls == ["wrap", "wrap"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register_backend(registry.Backend(scheme="toy", load=lambda ref: None, describe=""))


def test_shipped_checkpoints_load_their_files_tensor_for_tensor():
    from safetensors.torch import load_file

    from xclip.backbones import checkpoint_path, checkpoints_dir

    names = sorted(
        p.name
        for p in checkpoints_dir().iterdir()
        if (p / "config.json").is_file() and '"architecture": "openclip"' in (p / "config.json").read_text()
    )
    assert "tiny-shapes" in names
    for name in names:
        state = load_backbone(f"xclip:{name}").model.state_dict()
        stored = load_file(str(checkpoint_path(f"xclip:{name}") / "model.safetensors"))
        assert state.keys() == stored.keys()
        for key, value in stored.items():
            assert torch.equal(state[key], value.float() if value.is_floating_point() else value), (name, key)


def test_shipped_checkpoints_trace_to_their_own_embedding_and_a_patch_grid():
    """The traced forward the explainers use pools to the model's own embedding on every shipped
    open_clip checkpoint (the SigLIP-style one: register tokens dropped, the `map` head's query)."""
    from xclip.backbones import checkpoints_dir

    names = sorted(
        p.name
        for p in checkpoints_dir().iterdir()
        if (p / "config.json").is_file() and '"architecture": "openclip"' in (p / "config.json").read_text()
    )
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name in names:
        bb = load_backbone(f"xclip:{name}")
        x = bb.normalize(images)
        with torch.no_grad():
            trace = bb.trace_image(x, 1)
            own = bb.model.encode_image(x)
        torch.testing.assert_close(trace.embedding, own, atol=1e-5, rtol=0, msg=name)
        assert trace.grid == (8, 8) and trace.patch_tokens.shape[1] == 64, name
