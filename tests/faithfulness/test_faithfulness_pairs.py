"""Pair selection, the Bradley-Terry loss and pairwise accuracy against hand computations."""

import math

import pytest
import torch

from xclip.faithfulness.pairs import (
    bradley_terry_loss,
    pairwise_accuracy,
    prompt_weights,
    select_pairs,
)


def log1pexp(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_loss_by_hand():
    r_a = torch.tensor([3.0, 0.0, 1.5])
    r_b = torch.tensor([1.0, 1.0, 1.5])
    p = torch.tensor([1.0, 0.0, 0.5])
    # d = 2 (a wins): log(1 + e^-2); d = -1 (b wins): -log sigmoid(1) = log(1 + e^-1); tie at d = 0: log 2 - log 2
    want = [log1pexp(-2), log1pexp(-1), 0.0]
    assert bradley_terry_loss(r_a, r_b, p).item() == pytest.approx(sum(want) / 3, abs=1e-7)
    # a tie away from its optimum: 0.5 (log(1 + e^-1) + log(1 + e^1)) - log 2
    tie = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), 0.5).item()
    assert tie == pytest.approx(0.5 * (log1pexp(-1) + log1pexp(1)) - math.log(2), abs=1e-7)
    # the 2-way cross-entropy with the winner as target (ImageReward / HPSv2 form)
    logits = torch.stack([r_a[:2], r_b[:2]], 1)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert bradley_terry_loss(r_a[:2], r_b[:2], p[:2]).item() == pytest.approx(ce.item(), abs=1e-7)


def test_weighted_loss_is_the_weighted_mean():
    r_a, r_b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    w = torch.tensor([1.0, 3.0])
    want = (1 * log1pexp(-2) + 3 * math.log(2)) / 4
    assert bradley_terry_loss(r_a, r_b, 1.0, w).item() == pytest.approx(want, abs=1e-7)
    assert prompt_weights(torch.tensor([5, 5, 7, 5])).tolist() == [1 / 3, 1 / 3, 1.0, 1 / 3]
    with pytest.raises(ValueError, match="probability"):
        bradley_terry_loss(r_a, r_b, torch.tensor([1.0, 2.0]))


def test_pairwise_accuracy_by_hand():
    r_a = torch.tensor([0.9, 0.2, 0.5, 0.4, 0.1])
    r_b = torch.tensor([0.1, 0.3, 0.5, 0.3, 0.7])
    # a preferred everywhere: right, wrong, tie (wrong), right, wrong -> 2 / 5
    assert pairwise_accuracy(r_a, r_b) == pytest.approx(2 / 5)
    # labels: a, b, tie (skipped), b, b -> right, right, -, wrong, right -> 3 / 4
    assert pairwise_accuracy(r_a, r_b, torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0])) == pytest.approx(3 / 4)
    assert math.isnan(pairwise_accuracy(r_a[:1], r_b[:1], torch.tensor([0.5])))


def test_select_pairs_best_worst_and_all_with_margin():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.2, 0.2, 0.7])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # group 2 has one image: no pair
    assert select_pairs(scores, group).tolist() == [[1, 2], [3, 4]]  # ties: first minimum
    assert select_pairs(scores, group, margin=0.5).tolist() == [[1, 2]]  # 0.5 - 0.2 = 0.3 <= 0.5
    pairs = select_pairs(scores, group, "all", margin=0.15).tolist()
    # group 0: 0.9-0.3, 0.9-0.1, 0.3-0.1 (0.2 > 0.15); group 1: 0.5-0.2 twice, 0.2 vs 0.2 never
    assert pairs == [[0, 2], [1, 0], [1, 2], [3, 4], [3, 5]]
    # a group whose scores are all equal gives no best-vs-worst pair
    assert select_pairs(torch.tensor([0.4, 0.4]), torch.tensor([0, 0])).tolist() == []
    with pytest.raises(ValueError, match="pair rule"):
        select_pairs(scores, group, "pairwise")
