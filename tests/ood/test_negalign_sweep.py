"""NegAlign's per-image terms and variant scores against NegAlignScorer, the score table, ROC."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from xclip.metrics import ScoreTable, ood_metrics, roc_curve
from xclip.ood.negalign import NegAlignScorer
from xclip.ood.negalign_sweep import ALL_VARIANTS, NegAlignTerms, Variant, variant_scores, zscore_stats
from xclip.ood.neglabel import group_negatives, neglabel_score


def problem(seed=0, n=12, d=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(3, d, generator=g, dtype=torch.float64)
    negs = torch.randn(20, d, generator=g, dtype=torch.float64)
    images = torch.cat(
        [
            ids.repeat(2, 1)[: n // 2] + 0.3 * torch.randn(n // 2, d, generator=g, dtype=torch.float64),
            torch.randn(n - n // 2, d, generator=g, dtype=torch.float64),
        ]
    )
    backgrounds = torch.randn(n, d, generator=g, dtype=torch.float64)
    calib = (
        ids.repeat(3, 1) + 0.3 * torch.randn(9, d, generator=g, dtype=torch.float64),
        torch.randn(9, d, generator=g, dtype=torch.float64),
    )
    return ids, negs, images, backgrounds, calib


OBJECT_IDX = torch.tensor([0, 2, 3, 5, 7, 8, 11, 13, 14, 17, 19])
BG_IDX = torch.tensor([1, 4, 6, 9, 10])
TAU = 0.5  # soft enough that no group score saturates at 1 (M3 needs spread)


def full_terms(ids, negs, k=2, n_groups=4):
    scorer = NegAlignScorer(
        ids,
        negs,
        object_idx=OBJECT_IDX,
        neg_bg_emb=negs[BG_IDX],
        n_groups=n_groups,
        seed=3,
        tau=TAU,
        m1_topk=k,
        m2_role_aware=True,
        k=3,
    )
    return NegAlignTerms(scorer)


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=lambda v: v.name)
def test_variant_scores_equal_negalign_scorer(variant):
    ids, negs, images, backgrounds, (cal_img, cal_bg) = problem()
    terms = full_terms(ids, negs)
    rows, stats = terms(images, backgrounds), zscore_stats(terms(cal_img, cal_bg))
    for lam in (0.0, 0.5, 2.0):
        scorer = NegAlignScorer(
            ids,
            negs,
            object_idx=OBJECT_IDX if variant.m2 else None,
            neg_bg_emb=negs[BG_IDX] if variant.p_align else None,
            n_groups=4,
            seed=3,
            tau=TAU,
            m1_topk=2 if variant.m1 else None,
            m2_role_aware=variant.m2,
            m3_zscore=variant.m3,
            use_p_align=variant.p_align,
            lam=lam,
            k=3,
        )
        if variant.m3:
            scorer.fit_zscore(cal_img, cal_bg if variant.p_align else None)
        expected = scorer(images, backgrounds if variant.p_align else None)
        torch.testing.assert_close(variant_scores(rows, variant, lam, stats), expected, rtol=1e-12, atol=1e-12)


def test_all_toggles_off_is_plain_neglabel_exactly():
    ids, negs, images, backgrounds, _ = problem(1)
    rows = full_terms(ids, negs)(images, backgrounds)
    plain = neglabel_score(images, ids, negs, group_negatives(len(negs), 4, 3), tau=TAU)
    assert torch.equal(variant_scores(rows, Variant(), 0.0), plain)
    assert torch.equal(variant_scores(rows, Variant(p_align=True), 0.0), plain)  # lambda 0
    assert torch.equal(variant_scores(rows, Variant(), 7.0), plain)  # no P_align: lambda unused


def test_terms_without_object_groups_or_background_negatives():
    ids, negs, images, backgrounds, _ = problem(2)
    scorer = NegAlignScorer(ids, negs, n_groups=4, seed=3, tau=TAU, m1_topk=2, use_p_align=False)
    terms = NegAlignTerms(scorer)
    rows = terms(images, backgrounds)
    assert rows["star_m2"].isnan().all() and rows["star_m1_m2"].isnan().all() and rows["p_align"].isnan().all()
    assert not rows["star"].isnan().any() and not rows["star_m1"].isnan().any()
    assert [v.name for v in ALL_VARIANTS if terms.available(v)] == ["neglabel", "m3", "m1", "m1+m3"]
    assert set(zscore_stats(rows)) == {"star", "star_m1"}  # unavailable terms get no statistics
    with pytest.raises(ValueError, match="m1_topk"):
        NegAlignTerms(NegAlignScorer(ids, negs, n_groups=4, use_p_align=False))


def test_m3_needs_statistics_that_vary():
    ids, negs, images, backgrounds, _ = problem(3)
    rows = full_terms(ids, negs)(images, backgrounds)
    with pytest.raises(ValueError, match="calibration"):
        variant_scores(rows, Variant(m3=True), 0.0)
    flat = dict.fromkeys(rows, (0.5, 0.0))
    with pytest.raises(ValueError, match="do not vary"):
        variant_scores(rows, Variant(m3=True), 0.0, flat)
    with pytest.raises(ValueError, match="calibration rows"):
        zscore_stats({c: v[:0] for c, v in rows.items()})


def test_variant_names():
    assert Variant().name == "neglabel"
    assert Variant(True, False, True, True).name == "m1+m3+p_align"
    assert len({v.name for v in ALL_VARIANTS}) == 16


def test_score_table_concatenates_columns():
    table = ScoreTable(("s",), ("split",))
    table.update(s=torch.tensor([0.5, 0.25]), split=torch.tensor([0, 0]))
    table.update(s=torch.tensor([1.0]), split=torch.tensor([1]))
    out = table.compute()
    assert out["s"].dtype == torch.float64 and out["split"].dtype == torch.int64
    assert out["s"].tolist() == [0.5, 0.25, 1.0] and out["split"].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="exactly the columns"):
        table.update(s=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same B"):
        table.update(s=torch.tensor([1.0, 2.0]), split=torch.tensor([1]))
    table.reset()
    assert table.compute()["s"].numel() == 0


@pytest.mark.parametrize("tied", [False, True])
def test_roc_curve_matches_sklearn(tied):
    rng = np.random.default_rng(0)
    id_s, ood_s = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    if tied:
        id_s, ood_s = id_s.round(0), ood_s.round(0)
    fpr, tpr = roc_curve(torch.tensor(id_s), torch.tensor(ood_s))
    labels = np.r_[np.ones(200), np.zeros(150)]
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, np.r_[id_s, ood_s], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ood_metrics(id_s, ood_s)["auroc"], abs=1e-12)
    assert ood_metrics(id_s, ood_s)["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[id_s, ood_s]), abs=1e-12)


def test_sweep_combinations_are_consistent():
    ids, negs, images, backgrounds, (cal_img, cal_bg) = problem(4)
    terms = full_terms(ids, negs)
    rows, stats = terms(images, backgrounds), zscore_stats(terms(cal_img, cal_bg))
    for m1, m2 in itertools.product((False, True), repeat=2):
        star = variant_scores(rows, Variant(m1, m2, True), 0.0, stats)
        for lam in (0.5, 5.0):
            full = variant_scores(rows, Variant(m1, m2, True, True), lam, stats)
            align = variant_scores(rows, Variant(m3=True, p_align=True), 1.0, stats) - variant_scores(
                rows, Variant(m3=True), 0.0, stats
            )
            torch.testing.assert_close(full, star + lam * align)
