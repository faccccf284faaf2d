"""NegLabel and NegAlign scoring math on hand-made embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F

from xclip.ood import neglabel as neglabel_module
from xclip.ood.negalign import (
    BACKGROUND_TEMPLATES,
    OBJECT_TEMPLATES,
    NegAlignScorer,
    background_embedding,
    foreground_mask,
    p_align,
    role_scores,
    split_roles,
)
from xclip.ood.neglabel import (
    NegLabelScorer,
    group_negatives,
    mine_negatives,
    neg_mining,
    neglabel_score,
)

E = torch.eye(8, dtype=torch.float64)  # an orthonormal basis e0..e7


def unit(*coeffs):
    """Unit vector sum_i coeffs[i] * e_i (missing coefficients are 0)."""
    return F.normalize(torch.tensor(coeffs, dtype=torch.float64) @ E[: len(coeffs)], dim=-1)


def loop_neglabel(image_emb, id_emb, neg_emb, groups, tau):
    """The NegLabel formula, one image and one group at a time, in Python floats."""
    x, ids, negs = (F.normalize(t, dim=-1) for t in (image_emb, id_emb, neg_emb))
    scores = []
    for xi in x:
        pos = sum(math.exp(float(xi @ y) / tau) for y in ids)
        per_group = [pos / (pos + sum(math.exp(float(xi @ negs[j]) / tau) for j in g)) for g in groups.tolist()]
        scores.append(sum(per_group) / len(per_group))
    return torch.tensor(scores, dtype=torch.float64)


def hand_problem():
    g = torch.Generator().manual_seed(0)
    ids = torch.randn(4, 6, generator=g, dtype=torch.float64)
    negs = torch.randn(11, 6, generator=g, dtype=torch.float64)
    images = (
        torch.cat(
            [
                ids[:2] + 0.1 * torch.randn(2, 6, generator=g, dtype=torch.float64),  # near ID labels
                negs[:2] + 0.1 * torch.randn(2, 6, generator=g, dtype=torch.float64),  # near negatives
                torch.randn(2, 6, generator=g, dtype=torch.float64),
            ]
        )
        * 3
    )  # un-normalised on purpose
    return images, ids, negs


@pytest.mark.parametrize("n_groups", [1, 3])
def test_neglabel_score_equals_loop(n_groups):
    images, ids, negs = hand_problem()
    groups = group_negatives(len(negs), n_groups, seed=3)
    ours = neglabel_score(images, ids, negs, groups, tau=0.01)
    torch.testing.assert_close(ours, loop_neglabel(images, ids, negs, groups, 0.01), rtol=1e-12, atol=1e-12)
    assert ours[:2].min() > ours[2:4].max()  # ID-like images score above negative-like ones
    torch.testing.assert_close(NegLabelScorer(ids, negs, n_groups, seed=3)(images), ours, rtol=0, atol=0)


def test_neglabel_score_stable_at_low_temperature():
    images, ids, negs = hand_problem()
    groups = group_negatives(len(negs), 3)
    s = neglabel_score(images, ids, negs, groups, tau=1e-3)  # e^{1000} overflows a plain exp
    # the same formula in Python's exact-enough log domain: every exponent shifted by the row maximum
    x, y, n = (F.normalize(t, dim=-1) for t in (images, ids, negs))
    expected = []
    for xi in x:
        per_group = []
        for g in groups.tolist():
            logits = [float(xi @ yk) / 1e-3 for yk in y] + [float(xi @ n[j]) / 1e-3 for j in g]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            per_group.append(sum(weights[: len(y)]) / sum(weights))
        expected.append(sum(per_group) / len(per_group))
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert not torch.equal(s, s.round())  # not saturated to 0/1 everywhere: the test is informative


def test_group_negatives_drop_then_permute():
    groups = group_negatives(11, 3, seed=0)
    assert groups.shape == (3, 3) and groups.dtype == torch.long and groups.device.type == "cpu"
    # the last 11 mod 3 = 2 negatives are dropped, the other 9 appear once each
    assert sorted(groups.flatten().tolist()) == list(range(9))
    assert group_negatives(11, 1).shape == (1, 11)
    with pytest.raises(ValueError, match="n_groups"):
        group_negatives(5, 6)


def test_group_negatives_reproducible_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = group_negatives(1000, 100, seed=0)
    torch.manual_seed(2)
    torch.rand(7)
    b = group_negatives(1000, 100, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, group_negatives(1000, 100, seed=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_groups_same_on_gpu():
    images, ids, negs = hand_problem()
    cpu = NegLabelScorer(ids, negs, 3, seed=5)
    gpu = NegLabelScorer(ids.cuda(), negs.cuda(), 3, seed=5)
    assert torch.equal(cpu.groups, gpu.groups.cpu())
    torch.testing.assert_close(gpu(images.cuda()).cpu(), cpu(images))


def mining_case():
    # ID labels e0, e1, e2; each candidate has the given cosines with them (+ e3 to unit length)
    ids = E[:3, :4]
    cosines = [(0.55, 0, 0), (0.5, 0.5, 0.5), (0.9, 0.1, 0.0), (-0.3, -0.2, 0.1), (0.2, 0.2, 0.2), (0.6, 0.6, 0)]
    cands = torch.stack([unit(*c, math.sqrt(1 - sum(v * v for v in c))) for c in cosines])[:, :4]
    return cands, ids


def test_neg_mining_hand_case():
    cands, ids = mining_case()
    # 95th percentile over 3 classes, linear: sorted[1] + 0.9 * (sorted[2] - sorted[1])
    # -> 0.495, 0.5, 0.82, 0.07, 0.2, 0.6; ascending: 3, 4, 0, 1, 5, 2; keep int(6 * 0.5) = 3.
    # (max / nearest / higher interpolation would rank candidate 1 (0.5) before 0 (0.55).)
    assert neg_mining(cands * 4, ids, 0.95, 0.5).tolist() == [3, 4, 0]
    assert neg_mining(cands, ids, 0.95, 0.15).tolist() == []  # int(6 * 0.15) = 0
    assert neg_mining(cands, ids, 1.0, 0.5).tolist() == [3, 4, 1]  # the max: 0.1, 0.2, 0.5
    nouns, adjs = mine_negatives(cands, cands.flip(0), ids, 0.95, 0.5)
    assert nouns.tolist() == [3, 4, 0] and adjs.tolist() == [2, 1, 5]


def test_neg_mining_chunks_agree(monkeypatch):
    cands, ids = mining_case()
    monkeypatch.setattr(neglabel_module, "_QUANTILE_ELEMENTS", 6)  # two candidates per chunk
    assert neg_mining(cands, ids, 0.95, 0.5).tolist() == [3, 4, 0]


def templated(word, obj_cos, bg_cos, t_o=2, t_b=3):
    """Embeddings of one word and its templates with the given cosines to the word."""
    obj = unit(obj_cos, math.sqrt(1 - obj_cos**2))[None].repeat(t_o, 1)
    bg = unit(bg_cos, 0, 0, 0, 0, math.sqrt(1 - bg_cos**2))[None].repeat(t_b, 1)
    return word, obj, bg


def test_role_split_hand_vocabulary():
    assert OBJECT_TEMPLATES == ("a photo of a {}", "a close-up photo of a {}")
    assert BACKGROUND_TEMPLATES == ("a scene of {}", "a background of {}", "a texture of {}")
    e0 = E[0]
    # word 0 (object-like): object templates e0 +- 0.3 e1, one of them 10x longer: the mean of
    # normalised templates is e0 (cos 1); background templates e2, e3, e4 (cos 0) -> r = 1
    obj0 = torch.stack([10 * unit(math.cos(0.3), math.sin(0.3)), unit(math.cos(0.3), -math.sin(0.3))])
    words, objs, bgs = [e0], [obj0], [E[2:5]]
    # word 1 (background-like): the reverse -> r = -1
    words.append(e0), objs.append(E[2:4]), bgs.append(e0[None].repeat(3, 1))
    # 2: both 0.7 -> r = 0; 3: 1 vs 0.96 -> 0.04 (ambiguous); 4: 0.94 vs 1 -> -0.06 (background)
    for obj_cos, bg_cos in [(0.7, 0.7), (1.0, 0.96), (0.94, 1.0)]:
        w, o, b = templated(e0, obj_cos, bg_cos)
        words.append(w), objs.append(o), bgs.append(b)
    r = role_scores(torch.stack(words), torch.stack(objs), torch.stack(bgs))
    torch.testing.assert_close(r, torch.tensor([1, -1, 0, 0.04, -0.06], dtype=torch.float64))
    roles = split_roles(r, tau=0.05)
    assert roles["object"].tolist() == [0]
    assert roles["background"].tolist() == [1, 4]
    assert roles["ambiguous"].tolist() == [2, 3]


def test_foreground_mask_hand_cams():
    ramp = torch.arange(25.0).view(5, 5)  # 80th percentile 19.2 -> 20..24 (the last row) foreground
    peak = torch.zeros(5, 5)
    peak[2, 2] = 1.0  # 80th percentile 0 -> only the peak is above it
    cams = torch.stack([ramp, peak, torch.zeros(5, 5), torch.ones(5, 5)])
    fg, valid = foreground_mask(cams, percentile=80, dilation=0)
    assert valid.tolist() == [True, True, False, True]
    expect_ramp = torch.zeros(5, 5, dtype=torch.bool)
    expect_ramp[4] = True
    assert torch.equal(fg[0], expect_ramp)
    assert fg[1].sum() == 1 and fg[1, 2, 2]
    assert not fg[2].any()  # invalid: no foreground, the whole image is background
    assert fg[3].all()  # every patch ties with the maximum

    fg, _ = foreground_mask(cams, percentile=80, dilation=1)
    expect_ramp[3] = True  # the last row grows by one patch upwards
    assert torch.equal(fg[0], expect_ramp)
    expect_peak = torch.zeros(5, 5, dtype=torch.bool)
    expect_peak[1:4, 1:4] = True  # 3x3 around the peak
    assert torch.equal(fg[1], expect_peak)
    assert not fg[2].any()


def test_background_embedding_and_fallback():
    tokens = torch.arange(24.0).view(2, 4, 3)  # [N=2, P=4 (2x2 grid), W=3]
    fg = torch.tensor([[[True, True], [False, False]], [[True, True], [True, True]]])
    seen = []

    def embed_region(weights):  # a mean-then-head region embedding, as a CLIP ViT's
        pooled = torch.einsum("np,npw->nw", weights, tokens) / weights.sum(1, keepdim=True)
        seen.append(pooled)
        return 2 * pooled

    emb, fell_back = background_embedding(fg, embed_region)
    assert fell_back.tolist() == [False, True]
    torch.testing.assert_close(seen[0][0], tokens[0, 2:].mean(0))  # patches 2, 3 of image 0
    torch.testing.assert_close(seen[0][1], tokens[1].mean(0))  # all patches: fallback
    torch.testing.assert_close(emb, 2 * seen[0])


def test_p_align_hand_vectors():
    bg = torch.stack([3 * E[0], E[1]])
    cls = torch.stack([unit(0.8, 0.6), E[1]])
    neg_bg = torch.stack([unit(a, 0, math.sqrt(1 - a * a)) for a in (0.9, 0.5, -0.2, 0.1)])
    # image 0: 0.8 - (0.9 + 0.5) / 2 = 0.1; image 1: 1 - 0 = 1
    torch.testing.assert_close(p_align(bg, cls, neg_bg, k=2), torch.tensor([0.1, 1.0], dtype=torch.float64))
    # k above Mb = 4 takes all four: 0.8 - 0.325
    torch.testing.assert_close(p_align(bg, cls, neg_bg, k=10)[0], torch.tensor(0.475, dtype=torch.float64))


def test_negalign_all_off_is_neglabel_exactly():
    images, ids, negs = hand_problem()
    plain = NegLabelScorer(ids, negs, 3, seed=7)(images)
    off = NegAlignScorer(ids, negs, n_groups=3, seed=7, use_p_align=False)
    comps = off.components(images)
    assert torch.equal(comps["s_final"], plain)
    assert torch.equal(comps["s_neglabel_plain"], plain)
    assert torch.equal(comps["s_final"], neglabel_score(images, ids, negs, group_negatives(len(negs), 3, 7)))
    assert torch.isnan(comps["p_align"]).all()  # no backgrounds given
    assert torch.equal(comps["pred_class"], (images @ F.normalize(ids, dim=-1).T).argmax(1))
    # P_align on, lambda 0: still NegLabel exactly
    on = NegAlignScorer(ids, negs, neg_bg_emb=negs[:3], n_groups=3, seed=7, lam=0.0)
    assert torch.equal(on(images, torch.randn(len(images), 6, dtype=torch.float64)), plain)


def test_m1_topk_ignores_the_worst_groups():
    ids = E[:2]
    negs = torch.stack([unit(1, 0, 0.2), E[3], E[4], E[5]])  # negative 0 is a near-synonym of e0
    images = torch.stack([E[0], unit(1, 0, 0, 0, 0, 0, 1)])
    plain = NegAlignScorer(ids, negs, n_groups=4, use_p_align=False).components(images)
    m1 = NegAlignScorer(ids, negs, n_groups=4, m1_topk=3, use_p_align=False).components(images)
    # image 0: the group holding negative 0 scores ~0.87, the others ~1 -> top-3 mean ~1
    assert plain["s_neglabel_star"][0] < 0.98 < m1["s_neglabel_star"][0]
    assert (m1["s_neglabel_star"] >= plain["s_neglabel_star"]).all()
    assert torch.equal(m1["s_neglabel_plain"], plain["s_neglabel_plain"])
    all_groups = NegAlignScorer(ids, negs, n_groups=4, m1_topk=4, use_p_align=False).components(images)
    torch.testing.assert_close(all_groups["s_neglabel_star"], plain["s_neglabel_star"])


def test_m2_drops_background_negatives():
    ids = E[:2]
    negs = torch.stack([E[3], E[4], E[2]])  # 0, 1 object-leaning; 2 a background word ("water")
    image = unit(1, 0, 1)[None]  # an ID object (e0) on that background (e2)
    plain = NegAlignScorer(ids, negs, n_groups=1, use_p_align=False).components(image)
    m2 = NegAlignScorer(
        ids, negs, object_idx=torch.tensor([0, 1]), n_groups=1, m2_role_aware=True, use_p_align=False
    ).components(image)
    # with the background word, e^{70.7} sits on both sides of the ratio: ~0.5; without it ~1
    assert plain["s_neglabel_star"][0] == pytest.approx(0.5, abs=1e-3)
    assert m2["s_neglabel_star"][0] == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(m2["s_neglabel_plain"], plain["s_neglabel_plain"])


def align_case(**kwargs):
    ids = E[:2]
    negs = E[3:4]
    neg_bg = E[6:8]
    # A: a clean ID image on a background that looks like a background negative (P_align -0.5)
    # B: an ID image that resembles a negative (lower NegLabel) on a class-aligned background (P_align 1)
    images = torch.stack([E[0], unit(1, 0, 0, 0.8)])
    backgrounds = torch.stack([E[6], E[0]])
    scorer = NegAlignScorer(ids, negs, neg_bg_emb=neg_bg, n_groups=1, k=2, **kwargs)
    return scorer, images, backgrounds


def test_p_align_term_moves_the_score():
    scorer, images, backgrounds = align_case(lam=0.5)
    comps = scorer.components(images, backgrounds)
    torch.testing.assert_close(comps["p_align"], torch.tensor([-0.5, 1.0], dtype=torch.float64))
    assert comps["s_final"][0] < comps["s_neglabel_star"][0] and comps["s_final"][1] > comps["s_neglabel_star"][1]
    assert torch.equal(comps["s_final"], comps["s_neglabel_star"] + 0.5 * comps["p_align"])
    for lam in (0.0, 0.5, 2.0):  # a lambda sweep reuses the components
        expect = align_case(lam=lam)[0].components(images, backgrounds)["s_final"]
        assert torch.equal(NegAlignScorer.final_for(comps, lam), expect)


def test_m3_zscore_keeps_neglabel_from_being_swamped():
    scorer, images, backgrounds = align_case(lam=1.0)
    raw = scorer.components(images, backgrounds)
    assert raw["s_neglabel_star"][0] > raw["s_neglabel_star"][1]  # NegLabel prefers A...
    assert raw["s_final"][1] > raw["s_final"][0]  # ...but raw P_align (scale ~1) outweighs it
    z, _, _ = align_case(lam=1.0, m3_zscore=True)
    with pytest.raises(RuntimeError, match="fit_zscore"):
        z.components(images, backgrounds)
    # ID validation statistics: NegLabel* spreads by 1e-8 near 1, P_align by 10
    z.set_zscore_stats(neglabel=(1.0, 1e-8), p_align=(0.0, 10.0))
    comps = z.components(images, backgrounds)
    torch.testing.assert_close(comps["s_neglabel_star"], (raw["s_neglabel_star"] - 1.0) / 1e-8)
    torch.testing.assert_close(comps["p_align"], raw["p_align"] / 10)
    assert comps["s_final"][0] > comps["s_final"][1]  # on one scale, NegLabel's preference shows


def test_fit_zscore_on_id_validation_data():
    images, ids, negs = hand_problem()
    g = torch.Generator().manual_seed(1)
    backgrounds = torch.randn(len(images), 6, generator=g, dtype=torch.float64)
    scorer = NegAlignScorer(ids, negs, neg_bg_emb=negs[:4], n_groups=3, m3_zscore=True, k=2)
    scorer.fit_zscore(images, backgrounds, batch_size=4)  # two chunks
    comps = scorer.components(images, backgrounds)
    for key in ("s_neglabel_star", "p_align"):
        assert comps[key].mean().item() == pytest.approx(0, abs=1e-9)
        assert comps[key].std(correction=0).item() == pytest.approx(1, abs=1e-9)

    # NaN ID images give no NegLabel* statistics: refused by name, not left NaN until scoring
    broken = images.clone()
    broken[2] = math.nan
    with pytest.raises(ValueError, match="fit_zscore: NegLabel\\* is NaN"):
        scorer.fit_zscore(broken, backgrounds)


def test_negalign_argument_checks():
    _, ids, negs = hand_problem()
    with pytest.raises(ValueError, match="object_idx"):
        NegAlignScorer(ids, negs, n_groups=3, m2_role_aware=True, use_p_align=False)
    with pytest.raises(ValueError, match="neg_bg_emb"):
        NegAlignScorer(ids, negs, n_groups=3)
    with pytest.raises(ValueError, match="m1_topk"):
        NegAlignScorer(ids, negs, n_groups=3, m1_topk=4, use_p_align=False)
    with pytest.raises(ValueError, match="bg_emb"):
        NegAlignScorer(ids, negs, neg_bg_emb=negs, n_groups=3)(torch.randn(2, 6, dtype=torch.float64))
