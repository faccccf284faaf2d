"""Inter-annotator agreement: Cohen's kappa for a pair of annotators, Fleiss' kappa for many.

Both are undefined (NaN) when chance agreement is 1, i.e. every rating falls in one category.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two annotators' labels on the same items (same order, length N >= 1).

    ``kappa = (p_o - p_e) / (1 - p_e)``, with ``p_o`` the observed agreement and ``p_e`` the
    agreement expected from each annotator's own label frequencies.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"{len(labels_a)} labels from one annotator but {len(labels_b)} from the other")
    if not labels_a:
        return float("nan")
    categories = sorted(set(labels_a) | set(labels_b), key=str)
    index = {c: i for i, c in enumerate(categories)}
    confusion = np.zeros((len(categories), len(categories)))
    for a, b in zip(labels_a, labels_b):
        confusion[index[a], index[b]] += 1
    confusion /= confusion.sum()
    p_o = np.trace(confusion)
    p_e = float(confusion.sum(1) @ confusion.sum(0))
    return float((p_o - p_e) / (1.0 - p_e)) if p_e < 1.0 else float("nan")


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from a rating table `counts` [N items, C categories]: ``counts[i, j]`` raters
    put item i in category j; every item has the same number of raters n >= 2."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(f"counts must be [N items, C categories] with N >= 1, got shape {counts.shape}")
    raters = counts.sum(1)
    n = raters[0]
    if n < 2 or not np.all(raters == n):
        raise ValueError(f"every item needs the same number (>= 2) of raters, got {sorted(set(raters.tolist()))}")
    p_item = ((counts * (counts - 1)).sum(1)) / (n * (n - 1))  # agreement on each item
    p_category = counts.sum(0) / counts.sum()
    p_bar, p_e = p_item.mean(), float((p_category**2).sum())
    return float((p_bar - p_e) / (1.0 - p_e)) if p_e < 1.0 else float("nan")


def rating_table(labels_per_item: Sequence[Sequence[Hashable]], categories: Sequence[Hashable]) -> np.ndarray:
    """Per-item labels (one list per item, one entry per rater) -> counts [N items, C categories]."""
    index = {c: j for j, c in enumerate(categories)}
    counts = np.zeros((len(labels_per_item), len(categories)), dtype=np.int64)
    for i, labels in enumerate(labels_per_item):
        for label in labels:
            counts[i, index[label]] += 1
    return counts


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of two annotators on the items both labelled."""

    annotator_a: str
    annotator_b: str
    n_items: int
    observed: float  # fraction of those items with equal labels
    kappa: float


def pairwise_cohen(labels: Mapping[str, Mapping[str, Hashable]]) -> list[PairAgreement]:
    """Cohen's kappa for every pair of annotators on the items both labelled.

    Args:
        labels: annotator -> {item id -> label}.
    """
    out = []
    for a, b in itertools.combinations(sorted(labels), 2):
        shared = sorted(set(labels[a]) & set(labels[b]))
        la, lb = [labels[a][i] for i in shared], [labels[b][i] for i in shared]
        observed = sum(x == y for x, y in zip(la, lb)) / len(shared) if shared else float("nan")
        out.append(PairAgreement(a, b, len(shared), observed, cohen_kappa(la, lb)))
    return out


def fleiss_on_shared(labels: Mapping[str, Mapping[str, Hashable]], categories: Sequence[Hashable]) -> tuple[int, float]:
    """``(n_items, Fleiss' kappa)`` over the items every annotator labelled (NaN when there are
    none, or fewer than two annotators)."""
    if len(labels) < 2:
        return 0, float("nan")
    shared = sorted(set.intersection(*(set(v) for v in labels.values())))
    if not shared:
        return 0, float("nan")
    table = rating_table([[labels[a][i] for a in labels] for i in shared], categories)
    return len(shared), fleiss_kappa(table)
