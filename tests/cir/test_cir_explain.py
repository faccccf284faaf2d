"""Explanations A-D: batched over candidates equals one candidate at a time, and each piece equals
an independent computation (plain autograd through the full traced forward, the library's
Grad-ECLIP on the query embedding, text maps of the literal '$' prompt)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xclip.backbones import load_backbone
from xclip.backbones.base import PLACEHOLDER_TOKEN_ID
from xclip.cir.explain import CIRExplainer
from xclip.cir.phi import Phi, token_width
from xclip.cir.query import compose_query, encode_with_pseudo_tokens
from xclip.data.shapes import ShapesCIR
from xclip.explain import GradECLIP
from xclip.explain.gradeclip import combine_terms, grad_eclip_terms

CAPTION = "is blue instead of red"


@pytest.fixture(scope="module")
def setup():
    bb = load_backbone("xclip:tiny-shapes")
    torch.manual_seed(0)
    phi = Phi.for_backbone(bb).eval()
    ds = ShapesCIR(6, seed=5, split="val")
    reference = bb.normalize(ds[0]["reference"][None])
    candidates = bb.normalize(torch.stack([ds[i]["target"] for i in range(5)]))
    explainer = CIRExplainer(bb, phi)
    return bb, phi, explainer, reference, candidates, explainer.explain(reference, CAPTION, candidates)


def test_batched_equals_one_candidate_at_a_time(setup):
    _, _, explainer, reference, candidates, ex = setup
    singles = [explainer.explain(reference, CAPTION, candidates[k : k + 1]) for k in range(candidates.shape[0])]
    for name in ("candidate_maps", "reference_maps", "scores", "candidate_emb"):
        torch.testing.assert_close(
            getattr(ex, name), torch.cat([getattr(s, name) for s in singles]), atol=1e-5, rtol=1e-4
        )
    torch.testing.assert_close(
        ex.prompt_words.token_scores, torch.cat([s.prompt_words.token_scores for s in singles]), atol=1e-5, rtol=1e-4
    )
    for s in singles:  # the per-query maps do not depend on the candidates
        torch.testing.assert_close(s.reference_norm_map, ex.reference_norm_map, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.reference_self_map, ex.reference_self_map, atol=1e-5, rtol=1e-4)
    assert ex.candidate_maps.shape == (5, 8, 8) and ex.reference_maps.shape == (5, 8, 8)
    assert float(ex.reference_maps.amax()) > 0 and float(ex.candidate_maps.amax()) > 0


def _reference_map(bb, target_fn, reference):
    """Grad-ECLIP map of a scalar target of the reference by plain autograd through the whole
    traced forward (no CLS-tail re-run, no batched VJP)."""
    with torch.enable_grad():
        trace = bb.trace_image(reference, n_blocks=1)
        last = trace.blocks[-1]
        (grad,) = torch.autograd.grad(target_fn(trace.embedding), last.attn_out)
    spatial, channel = grad_eclip_terms(
        grad[:, 0][:, None], last.q_heads[:, :, 0], last.k_heads[:, :, 1:], last.v_heads[:, :, 1:]
    )
    return combine_terms(spatial, channel)[0, 0].reshape(8, 8)


def test_reference_maps_equal_plain_autograd(setup):
    bb, phi, _, reference, candidates, ex = setup
    prompt = compose_query(CAPTION)
    with torch.no_grad():
        cand = F.normalize(bb.encode_image(candidates), dim=-1)
    for k in (0, 3):

        def s_k(emb, k=k):
            q = encode_with_pseudo_tokens(bb, [prompt], phi(emb))
            return (F.normalize(q, dim=-1) @ cand[k]).sum()

        torch.testing.assert_close(ex.reference_maps[k], _reference_map(bb, s_k, reference), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(
        ex.reference_norm_map, _reference_map(bb, lambda e: phi(e).norm(), reference), atol=1e-6, rtol=1e-4
    )

    def self_cos(emb):
        return F.cosine_similarity(encode_with_pseudo_tokens(bb, ["a photo of $"], phi(emb)), emb).sum()

    torch.testing.assert_close(ex.reference_self_map, _reference_map(bb, self_cos, reference), atol=1e-6, rtol=1e-4)


def test_candidate_maps_equal_library_grad_eclip_on_the_query_embedding(setup):
    bb, phi, _, reference, candidates, ex = setup
    with torch.no_grad():
        query = encode_with_pseudo_tokens(bb, [compose_query(CAPTION)], phi(bb.encode_image(reference)))
        scores = F.normalize(bb.encode_image(candidates), dim=-1) @ F.normalize(query, dim=-1)[0]
    torch.testing.assert_close(
        ex.candidate_maps, GradECLIP(bb).image_maps(candidates, query)[:, 0], atol=1e-6, rtol=1e-4
    )
    torch.testing.assert_close(ex.scores, scores, atol=1e-5, rtol=0)


def test_token_scores_include_the_pseudo_token_and_match_the_literal_prompt():
    """With phi returning the '$' embedding itself, D equals Grad-ECLIP's text map of the literal
    prompt (no injection), and '$' is one of its words."""
    bb = load_backbone("xclip:tiny-shapes")
    phi = Phi.for_backbone(bb).eval()
    dollar = bb.token_embedding(torch.tensor([[PLACEHOLDER_TOKEN_ID]]))[0, 0].detach()
    with torch.no_grad():
        phi.layers[6].weight.zero_()
        phi.layers[6].bias.copy_(dollar)
    ds = ShapesCIR(4, seed=2, split="val")
    reference = bb.normalize(ds[0]["reference"][None])
    candidates = bb.normalize(torch.stack([ds[i]["target"] for i in range(3)]))
    ex = CIRExplainer(bb, phi).explain(reference, "also has a star", candidates)
    plain = GradECLIP(bb).text_maps(candidates, [compose_query("also has a star")])
    torch.testing.assert_close(ex.prompt_words.word_scores, plain.word_scores, atol=1e-6, rtol=1e-4)
    assert ex.prompt_words.words[0] == ["a", "photo", "of", "$", "that", "also", "has", "a", "star"]
    assert ex.self_words.words[0] == ["a", "photo", "of", "$"]
    assert torch.allclose(ex.prompt_words.word_scores.sum(-1), torch.ones(3, 1))
    assert token_width(bb) == phi.output_dim


def test_inputs_are_checked(setup):
    _, _, explainer, reference, candidates, _ = setup
    with pytest.raises(ValueError, match=r"one model input \[1, 3, H, W\]"):
        explainer.explain(candidates[:2], CAPTION, candidates)
    with pytest.raises(ValueError, match="K >= 1"):
        explainer.explain(reference, CAPTION, candidates[:0])
    with pytest.raises(ValueError, match=r"the relative caption . . is empty"):
        explainer.explain(reference, " ", candidates)


def test_figures_show_the_plain_candidate_and_keep_labels_clear_of_the_colour_bar(setup, tmp_path, monkeypatch):
    from xclip.cir import report

    _, _, _, _, _, ex = setup
    ds = ShapesCIR(6, seed=5, split="val")
    ref01, cands01 = ds[0]["reference"], torch.stack([ds[i]["target"] for i in range(2)])
    calls, draw = [], report.panels_figure

    def recording(panels, title, **kwargs):
        calls.append((panels, draw(panels, title, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(report, "panels_figure", recording)
    report.write_query_explanation(tmp_path, "q", CAPTION, ref01, "ref.png", cands01, ["c0.png", "c1.png"], [1, 2], ex)
    assert len(calls) == 3  # reference_A, rank001_BC, rank002_BC
    for k, (panels, _) in enumerate(calls[1:]):
        caption, image, heat = panels[0]  # the candidate as it is (an overlay hides its colours), then B over it
        assert caption == f"candidate rank {k + 1}" and heat is None and torch.equal(image, cands01[k])
        assert torch.equal(panels[1][1], cands01[k]) and torch.equal(panels[1][2], ex.candidate_maps[k])
    for _panels, fig in calls:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bar = fig.axes[-1].get_tightbbox(renderer)  # the colour bar with its ticks and label
        for ax in fig.axes[:-1]:
            label = ax.xaxis.label
            assert not label.get_window_extent(renderer).overlaps(bar), label.get_text()
