"""SEARLE's pieces: phi and its released layout, pseudo-token injection, query building, OTI
(batched == one image at a time), phi's losses. Tiny offline models of all three backbone layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import sequence_first_twin, tiny_clip, tiny_hf_clip
from torch import nn

from xclip.backbones import load_backbone, wrap_model
from xclip.backbones.base import PLACEHOLDER_TOKEN_ID
from xclip.cir.concepts import (
    PhraseBank,
    all_concepts,
    concept_phrases,
    replace_concept,
    scene_concepts,
)
from xclip.cir.losses import cosine_loss, nt_xent
from xclip.cir.oti import OTIConfig, oti_invert
from xclip.cir.phi import (
    SEARLE_RELEASES,
    Phi,
    check_compatible,
    load_phi,
    load_searle_phi,
    save_phi,
    save_searle_state,
    searle_hub_path,
    token_width,
)
from xclip.cir.query import (
    compose_query,
    encode_plain,
    encode_with_pseudo_tokens,
    fashioniq_queries,
    query_features,
    trim_to_eot,
)
from xclip.data.shapes.scene import Scene, ShapeObject

KINDS = ("openclip_bf", "openclip_sf", "hf")


@pytest.fixture(scope="module")
def backbones():
    oc = tiny_clip()
    return {
        "openclip_bf": wrap_model(oc),
        "openclip_sf": wrap_model(sequence_first_twin(oc)),
        "hf": wrap_model(tiny_hf_clip()),
    }


@pytest.fixture(params=KINDS)
def bb(request, backbones):
    return backbones[request.param]


# ---- phi -------------------------------------------------------------------------------------
def test_phi_is_searles_mlp():
    phi = Phi(512, 2048, 512)
    kinds = [type(m) for m in phi.layers]
    assert kinds == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert [phi.layers[i].weight.shape for i in (0, 3, 6)] == [(2048, 512), (2048, 2048), (512, 2048)]
    assert phi.layers[2].p == phi.layers[5].p == 0.5
    x = torch.randn(3, 512)
    phi.eval()
    expected = phi.layers[6](F.gelu(phi.layers[3](F.gelu(phi.layers[0](x)))))
    torch.testing.assert_close(phi(x), expected)
    with pytest.raises(ValueError, match=r"image features \[N, 512\]"):
        phi(torch.randn(3, 768))


def _searle_state(d_in: int, hidden: int, d_out: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict written the way SEARLE's Phi (nn.Sequential named `layers`) stores it."""
    g = torch.Generator().manual_seed(seed)
    shapes = {0: (hidden, d_in), 3: (hidden, hidden), 6: (d_out, hidden)}
    state = {}
    for i, (o, n) in shapes.items():
        state[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / math.sqrt(n)
        state[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.01
    return state


def test_searle_released_layout_loads_from_a_file_and_the_hub_cache(tmp_path, monkeypatch):
    for name, (d_in, hidden, d_out, file) in SEARLE_RELEASES.items():
        state = _searle_state(d_in, hidden, d_out)
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        path = searle_hub_path(name)
        assert path == tmp_path / "hub" / "checkpoints" / file
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 50, "Phi": state}, path)  # a training checkpoint also holds 'epoch'
        for phi in (load_searle_phi(name), load_searle_phi(path), load_phi(f"searle:{name}"), load_phi(path)):
            assert not phi.training and (phi.input_dim, phi.hidden_dim, phi.output_dim) == (d_in, hidden, d_out)
            x = torch.randn(2, d_in)
            h = F.gelu(x @ state["layers.0.weight"].T + state["layers.0.bias"])
            h = F.gelu(h @ state["layers.3.weight"].T + state["layers.3.bias"])
            torch.testing.assert_close(phi(x), h @ state["layers.6.weight"].T + state["layers.6.bias"])


def test_searle_loading_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="SEARLE_ViT-B32.pt") as err:
        load_searle_phi("ViT-B/32")
    assert "releases/download/weights/SEARLE_ViT-B32.pt" in str(err.value)
    with pytest.raises(ValueError, match="unknown SEARLE release"):
        load_searle_phi("ViT-H/14") if False else searle_hub_path("ViT-H/14")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="under the key 'Phi', found \\['state_dict'\\]"):
        load_searle_phi(tmp_path / "other.pt")
    state = _searle_state(8, 32, 8)
    state["layers.9.weight"] = state.pop("layers.6.weight")
    torch.save({"Phi": state}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="layers.0, layers.3, layers.6"):
        load_searle_phi(tmp_path / "bad.pt")
    # a ViT-L/14-sized file cached under the ViT-B/32 name is refused
    path = searle_hub_path("ViT-B/32")
    path.parent.mkdir(parents=True)
    torch.save({"Phi": _searle_state(768, 3072, 768)}, path)
    with pytest.raises(ValueError, match="is not SEARLE ViT-B/32"):
        load_searle_phi("ViT-B/32")


def test_xclip_format_roundtrip_keeps_the_card_and_searle_export(tmp_path):
    phi = Phi(32, 128, 64).eval()
    out = tmp_path / "phi"
    out.mkdir()
    (out / "README.md").write_text("card")
    save_phi(phi, out, {"backbone": "x"})
    assert (out / "README.md").read_text() == "card"
    assert json.loads((out / "config.json").read_text())["backbone"] == "x"
    x = torch.randn(4, 32)
    torch.testing.assert_close(load_phi(out)(x), phi(x))
    pt = save_searle_state(phi, tmp_path / "exported.pt", epoch=3)
    assert set(torch.load(pt, weights_only=True)) == {"Phi", "epoch"}
    torch.testing.assert_close(load_searle_phi(pt)(x), phi(x))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_phi(tmp_path)


def test_check_compatible(backbones):
    bb = backbones["openclip_bf"]
    check_compatible(Phi.for_backbone(bb), bb)
    assert Phi.for_backbone(bb).output_dim == token_width(bb) == 64
    with pytest.raises(ValueError, match="image features of 32 and token embeddings of 64"):
        check_compatible(Phi(768, 3072, 768), bb)


# ---- injection and queries -------------------------------------------------------------------
def test_injection_equals_plain_forward_when_phi_outputs_the_dollar_embedding(bb):
    """phi whose output is exactly the embedding of the '$' token: the composed query must equal
    the plain text forward of the same prompt (both open_clip layouts and HF)."""
    width = token_width(bb)
    dollar = bb.token_embedding(torch.tensor([[PLACEHOLDER_TOKEN_ID]]))[0, 0].detach()
    phi = Phi(bb.embed_dim, 4 * bb.embed_dim, width).eval()
    with torch.no_grad():
        phi.layers[6].weight.zero_()
        phi.layers[6].bias.copy_(dollar)
    captions = [["is blue instead of red"], ["also has a star"], ["is on water"]]
    feats = torch.randn(3, bb.embed_dim)
    with torch.no_grad():
        composed = query_features(bb, phi(feats), captions)
        plain = F.normalize(bb.encode_text([compose_query(c[0]) for c in captions]), dim=-1)
    torch.testing.assert_close(composed, plain, atol=1e-5, rtol=0)


def test_trimming_after_eot_does_not_change_the_embedding(bb):
    texts = ["a photo of $ that is blue", "$", "a photo of $ that also has a small red circle on water"]
    tokens = bb.tokenize(texts)
    assert trim_to_eot(bb, tokens).shape[1] < tokens.shape[1]
    pseudo = torch.randn(3, token_width(bb))
    with torch.no_grad():
        full = bb.encode_text_from_embeddings(bb.token_embedding(tokens), tokens, pseudo)
        torch.testing.assert_close(encode_with_pseudo_tokens(bb, texts, pseudo), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(encode_plain(bb, texts), bb.encode_text(tokens), atol=1e-5, rtol=0)


def test_a_prompt_without_dollar_is_an_error_naming_the_row(bb):
    with pytest.raises(ValueError, match=r"rows \[1\] contain no '\$'"):
        encode_with_pseudo_tokens(bb, ["a photo of $", "a photo of a cat"], torch.zeros(2, token_width(bb)))


def test_several_dollars_replace_only_the_first(bb):
    prompt = ["a photo of $ that is like $"]
    pseudo = torch.randn(1, token_width(bb))
    tokens = bb.tokenize(prompt)
    manual = bb.token_embedding(tokens).clone()
    first = int((tokens[0] == PLACEHOLDER_TOKEN_ID).nonzero()[0])
    manual[0, first] = pseudo[0]
    with torch.no_grad():
        torch.testing.assert_close(
            encode_with_pseudo_tokens(bb, prompt, pseudo),
            bb.encode_text_from_embeddings(manual, tokens),
            atol=1e-5,
            rtol=0,
        )


def test_query_strings():
    assert compose_query("is blue instead of red") == "a photo of $ that is blue instead of red"
    assert compose_query(" has a dog. ") == "a photo of $ that  has a dog. "  # CIRR/CIRCO: as given
    assert fashioniq_queries("is shorter.", " has stripes?") == (
        "a photo of $ that is shorter and has stripes",
        "a photo of $ that has stripes and is shorter",
    )
    with pytest.raises(
        ValueError,
        match=r"^the relative caption '  ' is empty: pass the change to make to the reference "
        r"image, e.g. 'is blue instead of red'$",
    ):
        compose_query("  ")  # was "compose_query: empty caption"
    with pytest.raises(ValueError, match=r"^FashionIQ's second caption '\?' is empty once '\.\?, ' are stripped"):
        fashioniq_queries("is red", "?")  # was accepted: "a photo of $ that is red and "


def test_fashioniq_combination_averages_two_normalised_queries(backbones):
    bb = backbones["openclip_bf"]
    pseudo = torch.randn(2, token_width(bb))
    captions = [("is red.", "has long sleeves,"), ("is darker", "is shiny?")]
    with torch.no_grad():
        got = query_features(bb, pseudo, captions)
        expected = []
        for q, (a, b) in enumerate(captions):
            a, b = a.strip(".?, "), b.strip(".?, ")
            one = F.normalize(
                encode_with_pseudo_tokens(bb, [f"a photo of $ that {a} and {b}"], pseudo[q : q + 1]), dim=-1
            )
            two = F.normalize(
                encode_with_pseudo_tokens(bb, [f"a photo of $ that {b} and {a}"], pseudo[q : q + 1]), dim=-1
            )
            expected.append(F.normalize(one + two, dim=-1)[0])
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-6, rtol=0)


# ---- concepts, OTI, losses -------------------------------------------------------------------
def test_concepts_and_phrases():
    scene = Scene(
        "water",
        (
            ShapeObject("circle", "red", "small", 0.3, 0.3),
            ShapeObject("circle", "blue", "large", 0.7, 0.7),
            ShapeObject("star", "red", "small", 0.3, 0.8),
        ),
    )
    assert scene_concepts(scene) == ["circle", "star"]
    assert scene_concepts(scene, "object") == ["red circle", "blue circle", "red star"]
    assert len(all_concepts("shape")) == 6 and len(all_concepts("object")) == 36
    for kind, concept in (("shape", "heart"), ("object", "green cross")):
        phrases = concept_phrases(concept, 20, seed=1, kind=kind)
        assert len(set(phrases)) == 20 and phrases == concept_phrases(concept, 20, seed=1, kind=kind)
        assert all(p.count(concept) == 1 for p in phrases)
    assert replace_concept("a red circle left of a circle", "circle", every=False) == "a red  $  left of a circle"
    assert replace_concept("a red circle left of a circle", "circle", every=True) == "a red  $  left of a  $ "
    with pytest.raises(ValueError, match="does not contain the concept"):
        replace_concept("a blue star", "circle", every=True)


def test_nt_xent_matches_searles_formula():
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b = F.normalize(v1, dim=1), F.normalize(v2, dim=1)
    tau = 0.25
    numerator = torch.exp(torch.diag(a @ b.T) / tau).repeat(2)
    joint = torch.cat([a, b])
    pairs = torch.exp(joint @ joint.T / tau)
    denominator = (pairs - pairs * torch.eye(12)).sum(0)
    expected = -torch.log(numerator / denominator).mean()
    torch.testing.assert_close(nt_xent(v1, v2, tau), expected)
    assert float(cosine_loss(v1, v1)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_shapes():
    return load_backbone("xclip:tiny-shapes")


def test_oti_batched_equals_one_image_at_a_time(tiny_shapes):
    bb = tiny_shapes
    bank = PhraseBank.build(bb, "shape", per_concept=6, seed=0)
    feats = torch.randn(3, bb.embed_dim, generator=torch.Generator().manual_seed(0))
    keys, concepts = [5, 11, 2], [["circle", "star"], ["heart"], ["square", "cross", "circle"]]
    config = OTIConfig(steps=4, seed=3)
    batched = oti_invert(bb, feats, keys, concepts, bank, config)
    singles = torch.cat([oti_invert(bb, feats[i : i + 1], [keys[i]], [concepts[i]], bank, config) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in bb.parameters() if p.grad is not None)


def test_oti_reduces_its_loss_and_keeps_an_ema(tiny_shapes):
    bb = tiny_shapes
    feats = bb.encode_image(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))).detach()
    losses = []
    config = OTIConfig(steps=30, seed=0)
    tokens = oti_invert(bb, feats, [0, 1], None, None, config, on_step=lambda s, c, r: losses.append(c))
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.05
    # one step: the EMA is 0.99 * init + 0.01 * the token after one AdamW step
    one = OTIConfig(steps=1, seed=0)
    first = oti_invert(bb, feats, [0, 1], None, None, one)
    init = oti_invert(bb, feats, [0, 1], None, None, OTIConfig(steps=0, seed=0))
    step = (first - 0.99 * init) / 0.01
    assert float((step - init).abs().max()) == pytest.approx(
        0.02, rel=0.05
    )  # Adam's first step moves each entry by ~lr
    assert tokens.shape == (2, token_width(bb)) and not tokens.requires_grad
    with pytest.raises(ValueError, match="images \\[1\\] have no concept"):
        oti_invert(bb, feats, [0, 1], [["circle"], []], PhraseBank.build(bb, "shape", 2), one)
