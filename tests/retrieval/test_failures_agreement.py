"""Taxonomy spellings, Cohen's kappa (against scikit-learn) and Fleiss' kappa (against the
textbook example of Fleiss 1971 as tabulated on Wikipedia: 10 items, 14 raters, 5 categories)."""

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from xclip.retrieval.failures.agreement import (
    cohen_kappa,
    fleiss_kappa,
    fleiss_on_shared,
    pairwise_cohen,
    rating_table,
)
from xclip.retrieval.failures.taxonomy import CATEGORIES, LABELS, SHORT_CODES, category, is_ambiguous, parse_label


@pytest.mark.parametrize(
    "spelling, label",
    [
        ("Ambiguous/underspecified", "Ambiguous/underspecified"),
        ("ambiguous (under-specified)", "Ambiguous/underspecified"),
        ("AMB-U", "Ambiguous/underspecified"),
        ("underspecified", "Ambiguous/underspecified"),
        ("Ambiguous: near duplicate", "Ambiguous/nearduplicate"),
        ("amb_n", "Ambiguous/nearduplicate"),
        (" ambiguous ", "Ambiguous"),
        ("attr", "Attribute"),
        ("ATTRIBUTE", "Attribute"),
        ("act", "Action"),
        ("cnt", "Count"),
        ("count", "Count"),
        ("ctx", "Context"),
        ("background", "Context"),
        ("spat", "Spatial"),
        ("Spatial", "Spatial"),
        ("obj", "Object"),
    ],
)
def test_long_and_short_spellings_parse_to_canonical_labels(spelling, label):
    assert parse_label(spelling) == label


@pytest.mark.parametrize("spelling", ["", "   ", "colour", "objct", "Ambiguous/other", "amb-x"])
def test_unknown_or_empty_spellings_are_rejected(spelling):
    assert parse_label(spelling) is None


def test_every_label_has_a_unique_short_code_and_a_category():
    assert len(set(SHORT_CODES.values())) == len(LABELS) == 9
    assert [parse_label(code) for code in SHORT_CODES.values()] == list(LABELS)
    assert {category(label) for label in LABELS} == set(CATEGORIES)
    assert [label for label in LABELS if is_ambiguous(label)] == [
        "Ambiguous/underspecified",
        "Ambiguous/nearduplicate",
        "Ambiguous",
    ]
    with pytest.raises(ValueError, match="canonical"):
        category("amb-u")


@pytest.mark.parametrize("seed", range(5))
def test_cohen_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = rng.choice(list(CATEGORIES), size=40).tolist()
    # b agrees with a on ~60% of items, otherwise random
    b = [x if rng.random() < 0.6 else str(rng.choice(list(CATEGORIES))) for x in a]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_cohen_kappa_hand_computed():
    # 2x2 table [[20, 5], [10, 15]]: p_o = 35/50, p_e = (25*30 + 25*20)/50^2 = 0.5 -> kappa = 0.4
    a = ["x"] * 25 + ["y"] * 25
    b = ["x"] * 20 + ["y"] * 5 + ["x"] * 10 + ["y"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(a, a) == 1.0
    assert math.isnan(cohen_kappa(["x"] * 4, ["x"] * 4))  # chance agreement 1: undefined
    with pytest.raises(ValueError, match="4 labels"):
        cohen_kappa(["x"] * 4, ["x"] * 3)


FLEISS_TABLE = np.array(
    [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
)


def test_fleiss_kappa_textbook_example():
    # P_bar = 0.378, P_e = 0.213 -> kappa = 0.210 (the published, rounded values)
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.20993, abs=5e-5)
    # the intermediate values from their definitions (P_i = sum_j n_ij (n_ij - 1) / (n (n - 1)), p_j = column / 140)
    p_bar = sum(int((r * (r - 1)).sum()) for r in FLEISS_TABLE) / (10 * 14 * 13)
    p_e = float(((FLEISS_TABLE.sum(0) / 140.0) ** 2).sum())
    assert p_bar == pytest.approx(0.378, abs=5e-4) and p_e == pytest.approx(0.213, abs=5e-4)
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx((p_bar - p_e) / (1 - p_e), abs=1e-12)


def test_fleiss_kappa_edge_cases():
    assert fleiss_kappa(np.array([[3, 0], [0, 3]])) == 1.0
    assert math.isnan(fleiss_kappa(np.array([[3, 0], [3, 0]])))
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[3, 0], [1, 1]]))


def test_two_raters_fleiss_equals_scotts_pi():
    # with 2 raters Fleiss' kappa is Scott's pi: pooled marginals for chance agreement
    a = ["x", "x", "y", "y", "z", "x", "y", "z"]
    b = ["x", "y", "y", "y", "z", "x", "x", "z"]
    p_o = sum(x == y for x, y in zip(a, b)) / len(a)
    pooled = {c: (a + b).count(c) / 16 for c in "xyz"}
    pi = (p_o - sum(v * v for v in pooled.values())) / (1 - sum(v * v for v in pooled.values()))
    assert fleiss_kappa(rating_table(list(zip(a, b)), "xyz")) == pytest.approx(pi, abs=1e-12)


def test_pairwise_cohen_and_fleiss_use_only_shared_items():
    labels = {
        "ann1": {"t1": "Object", "t2": "Spatial", "t3": "Count", "own1": "Object"},
        "ann2": {"t1": "Object", "t2": "Spatial", "t3": "Object", "own2": "Count"},
        "ann3": {"t1": "Object", "t2": "Count", "t3": "Count"},
    }
    pairs = {(p.annotator_a, p.annotator_b): p for p in pairwise_cohen(labels)}
    assert list(pairs) == [("ann1", "ann2"), ("ann1", "ann3"), ("ann2", "ann3")]
    assert pairs["ann1", "ann2"].n_items == 3 and pairs["ann1", "ann2"].observed == pytest.approx(2 / 3)
    want = cohen_kappa_score(["Object", "Spatial", "Count"], ["Object", "Spatial", "Object"])
    assert pairs["ann1", "ann2"].kappa == pytest.approx(want, abs=1e-12)
    n, kappa = fleiss_on_shared(labels, CATEGORIES)
    table = rating_table([["Object"] * 3, ["Spatial", "Spatial", "Count"], ["Count", "Object", "Count"]], CATEGORIES)
    assert n == 3 and kappa == pytest.approx(fleiss_kappa(table), abs=1e-12)
