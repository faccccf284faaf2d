"""Explainers (Grad-ECLIP, Grad-CAM, GAME, random) on tiny offline CLIP models.

The numeric checks compare the library against naive re-implementations written here from the
method descriptions (the Grad-ECLIP, Grad-CAM and GAME papers): hand-computed tensors, per-(image, text) autograd
through the whole forward, and the official Grad-ECLIP computation rebuilt from the raw weights.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from tiny_models import randomise_biases, tiny_hf_clip

from xclip.backbones import wrap_model
from xclip.explain import GAME, ClassSoftmax, GradCAM, GradECLIP, RandomMap, cosine
from xclip.explain.base import explaining, minmax, per_text_gradients
from xclip.explain.game import rollout
from xclip.explain.gradcam import cam_from_gradients
from xclip.explain.gradeclip import combine_terms, grad_eclip_terms, qk_weights

TEXTS = ["a photo of a cat", "a red square on water", "two blue circles"]
# "squareish" -> square|ish, "blorptastic" -> bl|or|p|tastic in the CLIP BPE
WORD_TEXTS = ["a squareish blorptastic cat", "a red square on water", "two blue circles"]
ATOL = 1e-5
SOFTMAX = ClassSoftmax(logit_scale=10.0)  # at CLIP's 100 the tiny random model saturates (grads ~1e-12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add spin-waiting, badly so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny models ---------------------------------------------------------------------------
def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16),  # 4 heads
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=3),
    )
    randomise_biases(model)
    return model.eval()


@pytest.fixture(scope="module")
def oc_model() -> CLIP:
    return tiny_clip()


@pytest.fixture(scope="module")
def bb(oc_model):
    return wrap_model(oc_model)


@pytest.fixture(scope="module")
def hf_bb():
    return wrap_model(tiny_hf_clip(text_layers=2, generic_biases=True))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_nontrivial(maps: torch.Tensor) -> None:
    """A map tensor worth comparing: finite, non-negative, some entries clearly positive."""
    assert torch.isfinite(maps).all()
    assert (maps >= 0).all()
    assert maps.max() > 1e-4, "maps are all (near) zero: the comparison would be vacuous"
    assert (maps > 1e-6).float().mean() > 0.2


def naive_minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def eot_positions(bb, texts) -> list[int]:
    return bb.eot_index(bb.tokenize(texts)).tolist()


# ---- 1. math on hand-built tensors ---------------------------------------------------------
def grad_eclip_scores(grad, q, k, v):
    """ReLU(sum_h sum_c g_hc lambda_hj v_hjc) from the two factors: [N, K, J]."""
    return combine_terms(*grad_eclip_terms(grad, q, k, v))


def test_grad_eclip_scores_hand_case():
    # one image, one head, dh=2, three tokens; two targets
    q = torch.tensor([[[1.0, 0.0]]])  # [N=1, H=1, dh=2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # cos = 1, 0, 1/sqrt2 -> lambda = 1, 0, 0.7071
    v = torch.tensor([[[[1.0, 2.0], [3.0, -1.0], [2.0, 1.0]]]])
    grad = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]])  # [N=1, K=2, W=2]
    # target 0: g.v = 3, 2, 3 -> lambda * g.v = 3, 0, 3/sqrt2
    # target 1: g.v = -1, 4, 1 -> -1, 0, 1/sqrt2 -> ReLU -> 0, 0, 1/sqrt2
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[[3.0, 0.0, 3 * s], [0.0, 0.0, s]]])
    torch.testing.assert_close(grad_eclip_scores(grad, q, k, v), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(qk_weights(q, k), torch.tensor([[[1.0, 0.0, s]]]), atol=1e-6, rtol=0)


def test_grad_eclip_scores_multihead_is_sum_of_heads_before_relu():
    g = torch.Generator().manual_seed(0)
    n, kk, heads, j, dh = 2, 3, 4, 5, 3
    grad = torch.randn(n, kk, heads * dh, generator=g)
    q, k, v = (
        torch.randn(n, heads, dh, generator=g),
        torch.randn(n, heads, j, dh, generator=g),
        torch.randn(n, heads, j, dh, generator=g),
    )
    out = grad_eclip_scores(grad, q, k, v)

    def pre_relu_single(h):  # ReLU(x) - ReLU(-x) = x, and the scores are linear in the gradient
        gh = grad[..., h * dh : (h + 1) * dh]
        args = (q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1])
        return grad_eclip_scores(gh, *args) - grad_eclip_scores(-gh, *args)

    torch.testing.assert_close(out, F.relu(sum(pre_relu_single(h) for h in range(heads))), atol=1e-6, rtol=0)
    # and against explicit loops
    naive = torch.zeros(n, kk, j)
    for a in range(n):
        for b in range(kk):
            tot = torch.zeros(j)
            for h in range(heads):
                lam = naive_minmax(torch.stack([F.cosine_similarity(q[a, h], k[a, h, t], dim=0) for t in range(j)]))
                tot += lam * (v[a, h] @ grad[a, b, h * dh : (h + 1) * dh])
            naive[a, b] = F.relu(tot)
    torch.testing.assert_close(out, naive, atol=1e-6, rtol=0)
    assert (out == 0).any() and (out > 0.1).any()


def test_qk_weights_key_mask():
    q = torch.tensor([[[1.0, 0.0]]])
    # cos: 0.6, -0.8, 0, 1 (the masked-out last key has the largest and would dominate the max)
    k = torch.tensor([[[[0.6, 0.8], [-0.8, 0.6], [0.0, 2.0], [3.0, 0.0]]]])
    mask = torch.tensor([[True, True, True, False]])
    out = qk_weights(q, k, mask)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.0, 0.8 / 1.4, 0.0]]]), atol=1e-6, rtol=0)
    unmasked = qk_weights(q, k)
    torch.testing.assert_close(unmasked, torch.tensor([[[1.4 / 1.8, 0.0, 0.8 / 1.8, 1.0]]]), atol=1e-6, rtol=0)


def test_minmax():
    assert torch.equal(minmax(torch.full((2, 5), 3.0)), torch.zeros(2, 5))
    torch.testing.assert_close(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    x = torch.tensor([[5.0, 1.0, 3.0, -7.0], [2.0, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # row 0: over 5, 1, 3 -> 1, 0, 0.5, (masked) 0; row 1: constant on the mask -> zeros
    torch.testing.assert_close(minmax(x, mask=mask), torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(minmax(x.T, dim=0), minmax(x, dim=-1).T)


def test_cam_from_gradients_hand_case():
    acts = torch.tensor([[[1.0, 3.0], [3.0, 4.0]]])  # [N=1, J=2, C=2]
    grads = torch.tensor([[[[1.0, 0.0], [3.0, -2.0]], [[-1.0, 0.0], [-1.0, 2.0]]]])  # [N=1, K=2, J, C]
    # target 0: w = (2, -1) -> 2*1-3 = -1, 2*3-4 = 2 -> ReLU -> 0, 2
    # target 1: w = (-1, 1) -> -1+3 = 2, -3+4 = 1
    expected = torch.tensor([[[0.0, 2.0], [2.0, 1.0]]])
    torch.testing.assert_close(cam_from_gradients(acts, grads), expected)


def test_rollout_two_block_hand_case():
    attn1 = torch.tensor([[[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.5, 0.5]]])[None]  # [N=1, H=2, L=2, L]
    grad1 = torch.tensor([[[1.0, -1.0], [2.0, 1.0]], [[1.0, 1.0], [-1.0, 2.0]]])[None, None]  # [N, K=1, H, L, L]
    attn2 = torch.tensor([[[0.4, 0.6], [0.0, 1.0]], [[0.4, 0.6], [0.0, 1.0]]])[None]
    grad2 = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])[None, None]
    # cam1 = mean_h clamp(g*a) = [[0.75, 0], [0.2, 0.9]] -> R1 = I + cam1 = [[1.75, 0], [0.2, 1.9]]
    # cam2 = [[0.2, 0.3], [0, 0.5]] -> R2 = R1 + cam2 @ R1 = [[2.16, 0.57], [0.3, 2.85]]
    r = rollout([attn1, attn2], [grad1, grad2])
    torch.testing.assert_close(r, torch.tensor([[[[2.16, 0.57], [0.3, 2.85]]]]), atol=1e-6, rtol=0)
    r1 = rollout([attn1], [grad1])
    torch.testing.assert_close(r1, torch.tensor([[[[1.75, 0.0], [0.2, 1.9]]]]), atol=1e-6, rtol=0)
    # the order of the blocks matters (R = I + cam @ R is applied block after block)
    assert not torch.allclose(rollout([attn2, attn1], [grad2, grad1]), r)


def test_per_text_gradients_hand_case():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)  # [N=2, C=2]
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # [C, K=3]
    scores = (x**2) @ a  # d scores[n,k] / d x[n,c] = 2 x[n,c] a[c,k]
    (g,) = per_text_gradients(scores, [x])
    assert g.shape == (3, 2, 2)
    for k in range(3):
        torch.testing.assert_close(g[k], 2 * x.detach() * a[:, k])


# ---- 2. against autograd through the whole traced forward ------------------------------------
def naive_grad_eclip_terms(bb, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-mode lambda [N, H, J] and g.v [N, K, H, J] with one autograd.grad per (image, text) and loops."""
    view = bb.vision_blocks()[-1]
    heads = view.num_heads
    txt = bb.encode_text(texts).detach()
    with torch.enable_grad():
        trace = bb.trace_image(images, n_blocks=1)
        last = trace.blocks[-1]
        cos = F.normalize(trace.embedding, dim=-1) @ F.normalize(txt, dim=-1).T
        n, length, width = last.attn_out.shape
        dh = width // heads
        spatial = torch.zeros(n, heads, length - 1)
        channel = torch.zeros(n, len(texts), heads, length - 1)
        for a in range(n):
            for h in range(heads):
                ch = slice(h * dh, (h + 1) * dh)
                spatial[a, h] = naive_minmax(
                    torch.stack(
                        [F.cosine_similarity(last.q[a, 0, ch], last.k[a, j, ch], dim=0) for j in range(1, length)]
                    )
                )
            for b in range(len(texts)):
                (g,) = torch.autograd.grad(cos[a, b], last.attn_out, retain_graph=True)
                # only the CLS row of image a reaches its embedding
                assert g[a, 1:].abs().max() == 0
                assert g[torch.arange(n) != a].abs().max() == 0
                for h in range(heads):
                    ch = slice(h * dh, (h + 1) * dh)
                    channel[a, b, h] = last.v[a, 1:, ch] @ g[a, 0, ch]
    return spatial.detach(), channel.detach()


def naive_grad_eclip_model(bb, images, texts) -> torch.Tensor:
    """Model-mode Grad-ECLIP image maps [N, K, gh, gw]: ReLU(sum over heads of lambda * g.v)."""
    spatial, channel = naive_grad_eclip_terms(bb, images, texts)
    p = bb.patch_size
    return F.relu((spatial[:, None] * channel).sum(2)).unflatten(-1, (images.shape[-2] // p, images.shape[-1] // p))


@pytest.mark.parametrize("kind", ["openclip", "hf"])
def test_gradeclip_model_mode_matches_autograd(kind, bb, hf_bb, images):
    backbone = bb if kind == "openclip" else hf_bb
    maps = GradECLIP(backbone).image_maps(images, TEXTS)
    assert maps.shape == (3, 3, 4, 4)
    assert_nontrivial(maps)
    torch.testing.assert_close(maps, naive_grad_eclip_model(backbone, images, TEXTS), atol=ATOL, rtol=0)


def test_gradeclip_terms_match_autograd_and_combine_to_the_maps(bb, images):
    explainer = GradECLIP(bb)
    terms = explainer.terms(images, TEXTS)
    heads, grid = bb.vision_blocks()[-1].num_heads, bb.grid_size
    assert terms.spatial.shape == (3, heads, *grid) and terms.channel.shape == (3, 3, heads, *grid)
    spatial, channel = naive_grad_eclip_terms(bb, images, TEXTS)
    torch.testing.assert_close(terms.spatial, spatial.unflatten(-1, grid), atol=ATOL, rtol=0)
    torch.testing.assert_close(terms.channel, channel.unflatten(-1, grid), atol=ATOL, rtol=0)
    # the channel term is signed (the ReLU comes after the head sum), lambda spans [0, 1] per head
    assert (terms.channel < 0).any() and (terms.channel > 0).any()
    flat = terms.spatial.flatten(2)
    torch.testing.assert_close(flat.amin(-1), torch.zeros(3, heads))
    torch.testing.assert_close(flat.amax(-1), torch.ones(3, heads))
    torch.testing.assert_close(combine_terms(terms.spatial, terms.channel), explainer.image_maps(images, TEXTS))
    paired = explainer.terms(images, TEXTS, pairs=True)
    torch.testing.assert_close(paired.spatial, terms.spatial)
    torch.testing.assert_close(paired.channel[:, 0], terms.channel.diagonal(dim1=0, dim2=1).movedim(-1, 0))


def test_gradcam_matches_autograd_on_the_library_forward(oc_model, bb, images):
    """Grad-CAM on the last block's ln_1 output, with the activations taken from the library's own
    forward (a forward hook swaps ln_1's output for a leaf) and one autograd.grad per pair."""
    maps = GradCAM(bb).image_maps(images, TEXTS)
    assert_nontrivial(maps)
    block = oc_model.visual.transformer.resblocks[-1]
    store = {}

    def swap(module, inputs, output):
        store["a"] = output.detach().requires_grad_(True)
        return store["a"]

    handle = block.ln_1.register_forward_hook(swap)
    try:
        with torch.enable_grad():
            emb = oc_model.encode_image(images)
            txt = oc_model.encode_text(bb.tokenize(TEXTS)).detach()
            cos = F.normalize(emb, dim=-1) @ F.normalize(txt, dim=-1).T
            acts = store["a"]
            expected = torch.zeros(3, 3, 16)
            for a in range(3):
                for b in range(3):
                    (g,) = torch.autograd.grad(cos[a, b], acts, retain_graph=True)
                    w = g[a, 1:].mean(0)  # mean gradient over the patch tokens
                    expected[a, b] = F.relu(acts[a, 1:].detach() @ w)
    finally:
        handle.remove()
    # the hooked activations are the explainer's: ln_1 of the traced last-block input
    with torch.no_grad():
        x_in = bb.trace_image(images, n_blocks=1).blocks[-1].x_in
        torch.testing.assert_close(acts.detach(), block.ln_1(x_in), atol=1e-6, rtol=0)
    torch.testing.assert_close(maps, expected.reshape(3, 3, 4, 4), atol=ATOL, rtol=0)


def test_game_matches_autograd_rollout(bb, images):
    """GAME over all three blocks: per-pair autograd of the cosine w.r.t. each block's attention
    probabilities, rollout R = I + cam @ R done with explicit per-pair matrices."""
    maps = GAME(bb, start_layer=0).image_maps(images, TEXTS)
    assert_nontrivial(maps)
    txt = bb.encode_text(TEXTS).detach()
    with torch.enable_grad():
        trace = bb.trace_image(images, n_blocks=3)
        cos = F.normalize(trace.embedding, dim=-1) @ F.normalize(txt, dim=-1).T
        attn = [b.attn_weights for b in trace.blocks]
        expected = torch.zeros(3, 3, 16)
        for a in range(3):
            for b in range(3):
                grads = torch.autograd.grad(cos[a, b], attn, retain_graph=True)
                r = torch.eye(17)
                for p, g in zip(attn, grads):
                    cam = (g[a] * p[a].detach()).clamp(min=0).mean(0)
                    r = r + cam @ r
                expected[a, b] = r[0, 1:]
    torch.testing.assert_close(maps, expected.reshape(3, 3, 4, 4), atol=ATOL, rtol=0)
    # the default (last block only) differs from the 3-block rollout
    assert not torch.allclose(GAME(bb).image_maps(images, TEXTS), maps, atol=1e-4)


# ---- 3. reference mode = the official computation --------------------------------------------
def capture_last_block_input(oc_model, images) -> torch.Tensor:
    block = oc_model.visual.transformer.resblocks[-1]
    store = {}
    handle = block.register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            oc_model.encode_image(images)
    finally:
        handle.remove()
    return store["x"]  # batch-first [N, L, W] (open_clip 3.x)


def official_image_maps(oc_model, images, texts) -> torch.Tensor:
    """The official generate_emap.py computation, naively: the last block as ONE head over the
    full width, cosine target, gradient at the CLS row of the pre-out_proj attention output,
    q and k through out_proj (weight and bias) for lambda, raw in-projected v."""
    x_in = capture_last_block_input(oc_model, images)
    block = oc_model.visual.transformer.resblocks[-1]
    visual = oc_model.visual
    tokens = open_clip_tokens(oc_model, texts)
    with torch.no_grad():
        txt = F.normalize(oc_model.encode_text(tokens), dim=-1)
    n, length, width = x_in.shape
    out = torch.zeros(n, len(texts), length - 1)
    with torch.enable_grad():
        for a in range(n):
            x = x_in[a]
            q, k, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
            o = ((q @ k.T) / math.sqrt(width)).softmax(-1) @ v
            o_leaf = o.detach().requires_grad_(True)
            y = x + block.ls_1(block.attn.out_proj(o_leaf))
            y = y + block.ls_2(block.mlp(block.ln_2(y)))
            emb = F.normalize(visual.ln_post(y[0]) @ visual.proj, dim=-1)
            q_out, k_out = block.attn.out_proj(q).detach(), block.attn.out_proj(k).detach()
            lam = naive_minmax(F.cosine_similarity(q_out[0][None], k_out[1:], dim=-1))
            for b in range(len(texts)):
                (g,) = torch.autograd.grad(emb @ txt[b], o_leaf, retain_graph=True)
                assert g[1:].abs().max() == 0
                out[a, b] = F.relu(lam * (v[1:].detach() @ g[0]))
    return out.reshape(n, len(texts), 4, 4)


def open_clip_tokens(oc_model, texts):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()(texts, context_length=oc_model.context_length)


def test_reference_mode_matches_official_computation(oc_model, bb, images):
    ref = GradECLIP(bb, mode="reference").image_maps(images, TEXTS)
    assert_nontrivial(ref)
    torch.testing.assert_close(ref, official_image_maps(oc_model, images, TEXTS), atol=ATOL, rtol=0)
    model = GradECLIP(bb).image_maps(images, TEXTS)
    assert oc_model.visual.transformer.resblocks[-1].attn.num_heads == 4
    assert (model - ref).abs().max() > 1e-3, "model and reference modes must differ on a multi-head model"


# ---- 4. batch == single ----------------------------------------------------------------------
EXPLAINERS = {
    "gradeclip_model": lambda b: GradECLIP(b),
    "gradeclip_reference": lambda b: GradECLIP(b, mode="reference"),
    "gradcam_ln1": lambda b: GradCAM(b),
    "gradcam_block_input": lambda b: GradCAM(b, layer="block_input"),
    "game_last": lambda b: GAME(b),
    "game_all": lambda b: GAME(b, start_layer=0),
}


@pytest.mark.parametrize("name", list(EXPLAINERS))
@pytest.mark.parametrize("size", [(32, 32), (48, 64)], ids=["model-size", "native-48x64"])
def test_batch_equals_single(name, size, bb):
    # at a size other than the model's 32 px the position embeddings are interpolated and the maps
    # follow the image's own grid (6x8 at 48x64)
    images = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    explainer = EXPLAINERS[name](bb)
    full = explainer.image_maps(images, TEXTS)
    assert full.shape == (3, 3, size[0] // 8, size[1] // 8)
    assert_nontrivial(full)
    per_image = torch.cat([explainer.image_maps(images[i : i + 1], TEXTS) for i in range(3)])
    torch.testing.assert_close(full, per_image, atol=ATOL, rtol=0)
    per_text = torch.cat([explainer.image_maps(images, [t]) for t in TEXTS], dim=1)
    torch.testing.assert_close(full, per_text, atol=ATOL, rtol=0)
    # the maps really depend on the image and on the text
    assert (full[0] - full[1]).abs().max() > 1e-5
    assert (full[:, 0] - full[:, 1]).abs().max() > 1e-5


@pytest.mark.parametrize("kind", ["openclip", "hf"])
def test_gradeclip_native_resolution_matches_autograd(kind, bb, hf_bb):
    backbone = bb if kind == "openclip" else hf_bb
    wide = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        GradECLIP(backbone).image_maps(wide, TEXTS), naive_grad_eclip_model(backbone, wide, TEXTS), atol=ATOL, rtol=0
    )
    words = GradECLIP(backbone).text_maps(wide, TEXTS)  # the image embedding at 48x64 too
    torch.testing.assert_close(words.token_scores.sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_gradcam_block_input_needs_a_matching_grid(bb):
    wide = torch.randn(1, 3, 48, 64)
    x_in = bb.trace_image(wide, n_blocks=1).blocks[-1].x_in
    with pytest.raises(ValueError, match="48 patch tokens, not a 4x4 grid"):
        GradCAM(bb).maps_from_block_input(x_in, TEXTS)
    assert GradCAM(bb).maps_from_block_input(x_in, TEXTS, grid=(6, 8)).shape == (1, 3, 6, 8)


@pytest.mark.parametrize("name", list(EXPLAINERS))
@pytest.mark.parametrize("target", ["cosine", SOFTMAX], ids=["cosine", "softmax"])
def test_pair_maps_are_the_diagonal(name, target, bb, images):
    explainer = EXPLAINERS[name](bb)
    pairs = explainer.pair_maps(images, TEXTS, target=target)
    assert pairs.shape == (3, 4, 4)
    assert_nontrivial(pairs)
    full = explainer.image_maps(images, TEXTS, target=target)
    torch.testing.assert_close(pairs, full.diagonal(dim1=0, dim2=1).permute(2, 0, 1), atol=ATOL, rtol=0)


def test_pair_maps_need_one_text_per_image(bb, images):
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        GradECLIP(bb).pair_maps(images, TEXTS[:2])
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        GradECLIP(bb).terms(images, TEXTS[:2], pairs=True)


def test_batch_equals_single_softmax_target(bb, images):
    explainer = GradECLIP(bb)
    full = explainer.image_maps(images, TEXTS, target=SOFTMAX)
    assert_nontrivial(full)
    single = torch.cat([explainer.image_maps(images[i : i + 1], TEXTS, target=SOFTMAX) for i in range(3)])
    torch.testing.assert_close(full, single, atol=ATOL, rtol=0)


# ---- 5. text maps ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_maps(bb, images):
    return GradECLIP(bb).text_maps(images, WORD_TEXTS)


def test_text_maps_structure(bb, text_maps):
    tm = text_maps
    eots = eot_positions(bb, WORD_TEXTS)
    assert eots == [9, 6, 4]
    lengths = [e - 1 for e in eots]
    assert tm.texts == WORD_TEXTS
    assert tm.token_scores.shape == (3, 3, max(lengths))
    assert [len(t) for t in tm.tokens] == lengths
    assert tm.tokens[0] == ["a", "square", "ish", "bl", "or", "p", "tastic", "cat"]
    assert tm.tokens[2] == ["two", "blue", "circles"]
    assert (tm.token_scores >= 0).all()
    for k, length in enumerate(lengths):
        assert (tm.token_scores[:, k, length:] == 0).all()
    sums = tm.token_scores.sum(-1)
    assert (((sums - 1).abs() < 1e-5) | (sums == 0)).all()
    assert ((sums - 1).abs() < 1e-5).sum() >= 6, "most rows should be non-empty for this seed"
    assert (tm.token_scores > 0).sum(-1).max() >= 2


def test_text_maps_words(text_maps):
    tm = text_maps
    assert tm.words == [t.split() for t in WORD_TEXTS]
    assert tm.word_scores.shape == (3, 3, 5)
    spans = {0: [(0, 1), (1, 3), (3, 7), (7, 8)], 1: [(i, i + 1) for i in range(5)], 2: [(0, 1), (1, 2), (2, 3)]}
    for k, span in spans.items():
        for w, (a, b) in enumerate(span):
            torch.testing.assert_close(tm.word_scores[:, k, w], tm.token_scores[:, k, a:b].sum(-1), atol=1e-6, rtol=0)
        assert (tm.word_scores[:, k, len(span) :] == 0).all()
    # "blorptastic" gets its mass from several sub-tokens, so the sums above are not vacuous
    assert ((tm.token_scores[:, 0, 3:7] > 1e-3).sum(-1) >= 2).any()
    assert (tm.word_scores[:, 0, 2] > 1e-3).all()
    pairs = tm.word_pairs(1, 0)
    assert [w for w, _ in pairs] == ["a", "squareish", "blorptastic", "cat"]
    assert [s for _, s in pairs] == pytest.approx(tm.word_scores[1, 0, :4].tolist())


def naive_text_scores_model(bb, images, texts, target) -> list[list[torch.Tensor]]:
    """Model mode: sum over the traced text blocks of lambda-weighted g.v at the EOT row, per head,
    lambda min-maxed over the causal keys 0..eot; ReLU after the sum; tokens 1..eot-1; normalised."""
    views = bb.text_blocks()
    heads = views[-1].num_heads
    with torch.no_grad():
        img = bb.encode_image(images)
    with torch.enable_grad():
        trace = bb.trace_text(texts, n_blocks=8)
        assert len(trace.blocks) == len(views)
        scores = target(img, trace.embedding)
        outs = [b.attn_out for b in trace.blocks]
        eots = trace.eot_index.tolist()
        result = []
        for a in range(images.shape[0]):
            row = []
            for b, e in enumerate(eots):
                grads = torch.autograd.grad(scores[a, b], outs, retain_graph=True)
                total = torch.zeros(e + 1)
                for blk, g in zip(trace.blocks, grads):
                    dh = blk.q.shape[-1] // heads
                    for h in range(heads):
                        ch = slice(h * dh, (h + 1) * dh)
                        lam = naive_minmax(F.cosine_similarity(blk.q[b, e, ch][None], blk.k[b, : e + 1, ch], dim=-1))
                        total += lam * (blk.v[b, : e + 1, ch] @ g[b, e, ch])
                s = F.relu(total)[1:e].detach()
                row.append(s / s.sum() if s.sum() > 0 else s)
            result.append(row)
    return result


def contrastive(image_emb, text_emb):
    """Cosine minus the cosine with the mean prompt: row n mixes all texts, in a new direction."""
    return cosine(image_emb, text_emb) - cosine(image_emb, text_emb.mean(0, keepdim=True))


TEXT_TARGETS = {"cosine": cosine, "softmax10": SOFTMAX, "contrastive": contrastive}


@pytest.mark.parametrize("target", list(TEXT_TARGETS))
def test_text_maps_match_naive_autograd(bb, images, text_maps, target):
    fn = TEXT_TARGETS[target]
    tm = text_maps if target == "cosine" else GradECLIP(bb).text_maps(images, WORD_TEXTS, target=fn)
    naive = naive_text_scores_model(bb, images, WORD_TEXTS, fn)
    for a in range(3):
        for b in range(3):
            s = naive[a][b]
            torch.testing.assert_close(tm.token_scores[a, b, : len(s)], s, atol=ATOL, rtol=0)
    diff = (tm.token_scores - text_maps.token_scores).abs().max()
    if target == "softmax10":
        # d p_k / d(text k) = s p_k (1 - p_k) d cos_k / d(text k): a positive multiple of the cosine
        # gradient at text k's own tokens, which the per-row normalisation removes
        assert diff < 1e-4
    elif target == "contrastive":
        assert diff > 1e-2


def test_text_maps_softmax_by_name_runs(bb, images, text_maps):
    by_name = GradECLIP(bb).text_maps(images, WORD_TEXTS, target="softmax")  # CLIP's scale 100
    assert by_name.token_scores.shape == text_maps.token_scores.shape
    assert (by_name.token_scores >= 0).all() and (by_name.token_scores <= 1 + 1e-6).all()
    assert (by_name.token_scores > 0).any()
    assert by_name.words == text_maps.words


def test_text_maps_rows_sum_to_one_for_tiny_gradients(bb, images, text_maps):
    tm = GradECLIP(bb).text_maps(images, WORD_TEXTS, target=lambda i, t: 1e-12 * cosine(i, t))
    sums = tm.token_scores.sum(-1)
    assert (((sums - 1).abs() < 1e-4) | (sums == 0)).all(), sums
    torch.testing.assert_close(tm.token_scores, text_maps.token_scores, atol=1e-5, rtol=0)


def official_text_scores(oc_model, images, texts) -> list[list[torch.Tensor]]:
    """The official grad_eclip_text, naively: the last n (here: all 3) text blocks recomputed as one
    head over the full width with the causal mask; lambda = min-max over ALL positions of
    cos(out_proj(q_eot), out_proj(k_j)); layers summed, ReLU, tokens 1..eot-1, normalised."""
    tokens = open_clip_tokens(oc_model, texts)
    with torch.no_grad():
        img = F.normalize(oc_model.encode_image(images), dim=-1)
    blocks = oc_model.transformer.resblocks
    mask = oc_model.attn_mask
    eots = tokens.argmax(-1).tolist()
    width = oc_model.token_embedding.weight.shape[1]
    with torch.enable_grad():
        x = oc_model.token_embedding(tokens) + oc_model.positional_embedding
        per_layer = []
        for blk in blocks:
            q, k, v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
            o = ((q @ k.transpose(1, 2)) / math.sqrt(width) + mask).softmax(-1) @ v
            per_layer.append((o, blk.attn.out_proj(q).detach(), blk.attn.out_proj(k).detach(), v.detach()))
            x = x + blk.ls_1(blk.attn.out_proj(o))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        pooled = oc_model.ln_final(x[torch.arange(len(texts)), tokens.argmax(-1)]) @ oc_model.text_projection
        cos = img @ F.normalize(pooled, dim=-1).T
        result = []
        for a in range(images.shape[0]):
            row = []
            for b, e in enumerate(eots):
                grads = torch.autograd.grad(cos[a, b], [p[0] for p in per_layer], retain_graph=True)
                total = 0
                for (_o, q_out, k_out, v), g in zip(per_layer, grads):
                    lam = naive_minmax(F.cosine_similarity(q_out[b, e][None], k_out[b], dim=-1))
                    total = total + lam * (v[b] @ g[b, e])
                s = F.relu(total)[1:e]
                row.append(s / s.sum() if s.sum() > 0 else s)
            result.append(row)
    return result


def test_text_maps_reference_mode_matches_official(oc_model, bb, images, text_maps):
    tm = GradECLIP(bb, mode="reference").text_maps(images, WORD_TEXTS)
    official = official_text_scores(oc_model, images, WORD_TEXTS)
    nonzero = 0
    for a in range(3):
        for b in range(3):
            s = official[a][b]
            nonzero += int(s.sum() > 0)
            torch.testing.assert_close(tm.token_scores[a, b, : len(s)], s, atol=ATOL, rtol=0)
    assert nonzero >= 6
    assert (tm.token_scores - text_maps.token_scores).abs().max() > 1e-3


def test_text_maps_batch_equals_single(bb, images, text_maps):
    explainer = GradECLIP(bb)
    for a in range(3):
        for b, text in enumerate(WORD_TEXTS):
            single = explainer.text_maps(images[a : a + 1], [text])
            length = single.token_scores.shape[-1]
            torch.testing.assert_close(
                single.token_scores[0, 0], text_maps.token_scores[a, b, :length], atol=ATOL, rtol=0
            )
            assert single.words[0] == text_maps.words[b]


def test_text_maps_errors(bb, images):
    with pytest.raises(ValueError):
        GradECLIP(bb).text_maps(images, [])
    with pytest.raises(ValueError):
        GradECLIP(bb).text_maps(images, TEXTS, target="nope")


# ---- 6. targets ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gradeclip_model", "gradeclip_reference", "gradcam_ln1", "game_last"])
def test_targets(name, bb, images):
    explainer = EXPLAINERS[name](bb)
    base = explainer.image_maps(images, TEXTS)
    assert_nontrivial(base)
    with torch.no_grad():
        emb = bb.encode_text(TEXTS)
    torch.testing.assert_close(explainer.image_maps(images, emb), base, atol=1e-6, rtol=0)
    doubled = explainer.image_maps(images, TEXTS, target=lambda i, t: 2 * cosine(i, t))
    torch.testing.assert_close(doubled, 2 * base, atol=1e-9, rtol=1e-6)
    soft = explainer.image_maps(images, TEXTS, target="softmax")
    assert torch.isfinite(soft).all() and (soft - base).abs().max() > 1e-6
    # __call__ is image_maps
    torch.testing.assert_close(explainer(images, TEXTS), base, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_target_and_text_errors(name, bb, images):
    explainer = EXPLAINERS[name](bb)
    with pytest.raises(ValueError, match="unknown target"):
        explainer.image_maps(images, TEXTS, target="cosinus")
    with pytest.raises(ValueError):
        explainer.image_maps(images, torch.zeros(2, 31))
    with pytest.raises(ValueError):
        explainer.image_maps(images, torch.zeros(32))
    with pytest.raises(ValueError):
        explainer.image_maps(images, [])


def test_constructor_errors(bb):
    with pytest.raises(ValueError):
        GradECLIP(bb, mode="official")
    with pytest.raises(ValueError):
        GradCAM(bb, layer="ln_2")
    with pytest.raises(ValueError):
        GAME(bb, start_layer=3).image_maps(torch.zeros(1, 3, 32, 32), TEXTS)
    with pytest.raises(ValueError):
        GAME(bb, start_layer=-4).image_maps(torch.zeros(1, 3, 32, 32), TEXTS)


def test_single_string_is_rejected(bb, images):
    with pytest.raises((TypeError, ValueError)):
        GradECLIP(bb).image_maps(images, "a cat")


# ---- 7. model state ----------------------------------------------------------------------------
def snapshot(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_state_restored_and_maps_unaffected(images):
    model = tiny_clip()
    backbone = wrap_model(model)
    eval_maps = GradECLIP(backbone).image_maps(images, TEXTS)
    model.train()
    model.visual.ln_post.eval()  # mixed flags
    model.visual.conv1.weight.requires_grad_(False)
    model.token_embedding.weight.requires_grad_(False)
    before = snapshot(model)
    assert True in before[0] and False in before[0] and True in before[1] and False in before[1]
    seen = []

    def spy(i, t):  # what the model looks like while the target is evaluated
        seen.append(snapshot(model))
        return cosine(i, t)

    for explainer in EXPLAINERS.values():
        maps = explainer(backbone).image_maps(images, TEXTS, target=spy)
        assert snapshot(model) == before
    GradECLIP(backbone).text_maps(images, TEXTS, target=spy)
    assert snapshot(model) == before
    assert len(seen) == len(EXPLAINERS) + 1
    for training, grads in seen:
        assert not any(training) and not any(grads)
    assert no_hooks(model)
    assert torch.equal(maps, EXPLAINERS["game_all"](backbone).image_maps(images, TEXTS, target=spy))
    # maps of a model left in train mode are those of the eval-mode model (open_clip has no dropout)
    torch.testing.assert_close(GradECLIP(backbone).image_maps(images, TEXTS), eval_maps, atol=0, rtol=0)


def test_state_restored_when_target_raises(images):
    model = tiny_clip()
    backbone = wrap_model(model)
    model.train()
    model.transformer.resblocks[0].requires_grad_(False)
    before = snapshot(model)

    def boom(i, t):
        raise RuntimeError("boom inside the explanation")

    for factory in EXPLAINERS.values():
        with pytest.raises(RuntimeError, match="boom inside"):
            factory(backbone).image_maps(images, TEXTS, target=boom)
        assert snapshot(model) == before
        assert no_hooks(model)
    with pytest.raises(RuntimeError, match="boom inside"):
        GradECLIP(backbone).text_maps(images, TEXTS, target=boom)
    assert snapshot(model) == before
    assert no_hooks(model)
    # also the context manager on its own
    with pytest.raises(KeyError):
        with explaining(model):
            assert not model.training
            raise KeyError("x")
    assert snapshot(model) == before


def test_train_mode_dropout_does_not_reach_image_maps(images):
    model = tiny_hf_clip(text_layers=2, generic_biases=True, attention_dropout=0.5)
    backbone = wrap_model(model)
    eval_maps = GradECLIP(backbone).image_maps(images, TEXTS)
    assert_nontrivial(eval_maps)
    model.train()
    torch.manual_seed(0)
    train_maps = GradECLIP(backbone).image_maps(images, TEXTS)
    assert model.training
    torch.testing.assert_close(train_maps, eval_maps, atol=ATOL, rtol=0)


def test_memory_does_not_grow(bb, images):
    explainer = GradECLIP(bb)
    with torch.no_grad():
        emb = bb.encode_text(TEXTS[:1])
    image = images[:1]
    counts = {}
    for i in range(1, 301):
        explainer.image_maps(image, emb)
        if i in (50, 300):
            gc.collect()
            counts[i] = len(gc.get_objects())
    assert counts[300] - counts[50] < 50, counts


def test_explainer_does_not_keep_the_model_alive(images):
    model = tiny_clip(seed=3)
    ref = weakref.ref(model)
    explainer = GradECLIP(wrap_model(model))
    explainer.text_maps(images[:1], TEXTS[:1])
    del explainer, model
    gc.collect()
    assert ref() is None


# ---- 8. Grad-CAM layer choice ------------------------------------------------------------------
def test_gradcam_on_block_output_is_all_zero(bb, images):
    ln1 = GradCAM(bb).image_maps(images, TEXTS)
    block_input = GradCAM(bb, layer="block_input").image_maps(images, TEXTS)
    assert_nontrivial(ln1)
    assert_nontrivial(block_input)
    assert (ln1 - block_input).abs().max() > 1e-5
    txt = bb.encode_text(TEXTS).detach()
    with torch.enable_grad():
        trace = bb.trace_image(images, n_blocks=1)
        out = trace.blocks[-1].x_out
        cos = F.normalize(trace.embedding, dim=-1) @ F.normalize(txt, dim=-1).T
        (grads,) = per_text_gradients(cos, [out])  # [K, N, L, W]
    assert grads[:, :, 0].abs().max() > 0  # the CLS row does get a gradient
    assert torch.equal(grads[:, :, 1:], torch.zeros_like(grads[:, :, 1:]))
    cam = cam_from_gradients(out.detach()[:, 1:], grads.transpose(0, 1)[:, :, 1:])
    assert cam.shape == (3, 3, 16)
    assert torch.equal(cam, torch.zeros_like(cam))


# ---- 9. HF backbone ------------------------------------------------------------------------------
def test_hf_gradeclip_image_and_text_maps(hf_bb, images):
    for mode in ("model", "reference"):
        explainer = GradECLIP(hf_bb, mode=mode)
        maps = explainer.image_maps(images, TEXTS)
        assert maps.shape == (3, 3, 4, 4)
        assert_nontrivial(maps)
        single = torch.cat([explainer.image_maps(images[i : i + 1], [t]) for i in range(3) for t in TEXTS])
        torch.testing.assert_close(maps.reshape(9, 1, 4, 4), single, atol=ATOL, rtol=0)
    tm = GradECLIP(hf_bb).text_maps(images, WORD_TEXTS)
    assert tm.words == [t.split() for t in WORD_TEXTS]
    assert (tm.token_scores >= 0).all()
    sums = tm.token_scores.sum(-1)
    assert (((sums - 1).abs() < 1e-5) | (sums == 0)).all() and ((sums - 1).abs() < 1e-5).any()
    for a in range(3):
        for b, text in enumerate(WORD_TEXTS):
            one = GradECLIP(hf_bb).text_maps(images[a : a + 1], [text])
            length = one.token_scores.shape[-1]
            torch.testing.assert_close(one.token_scores[0, 0], tm.token_scores[a, b, :length], atol=ATOL, rtol=0)
    naive = naive_text_scores_model(hf_bb, images, WORD_TEXTS, cosine)
    for a in range(3):
        for b in range(3):
            torch.testing.assert_close(tm.token_scores[a, b, : len(naive[a][b])], naive[a][b], atol=ATOL, rtol=0)


# ---- 10. random baseline -------------------------------------------------------------------------
def test_random_map(bb, images):
    r1, r2 = RandomMap(bb, seed=7), RandomMap(bb, seed=7)
    a1, b1 = r1.image_maps(images, TEXTS), r1.image_maps(images, TEXTS)
    a2, b2 = r2.image_maps(images, TEXTS), r2.image_maps(images, TEXTS)
    assert a1.shape == (3, 3, 4, 4)
    assert ((a1 >= 0) & (a1 < 1)).all()
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)
    assert not torch.equal(RandomMap(bb, seed=8).image_maps(images, TEXTS), a1)
    assert RandomMap(bb).image_maps(images[:2], torch.zeros(5, 32)).shape == (2, 5, 4, 4)
    assert a1.std() > 0.2  # roughly uniform, not constant
