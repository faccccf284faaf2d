"""Chosen/rejected pairs and the pairwise preference math (plain tensors).

- `select_pairs`: per prompt, best vs worst image by a score, or every ordered pair whose score
  difference exceeds a margin;
- `bradley_terry_loss`: ``-log sigmoid(r_w - r_l)`` (the 2-way cross-entropy of ImageReward,
  PickScore, HPSv2) with soft labels for ties (0.5/0.5) offset by the label's entropy, as
  PickScore's ``+ tie * log 0.5``, so every label's optimum loss is 0; optional per-example weights
  (PickScore: 1 / examples of the prompt);
- `pairwise_accuracy`: ``mean(r_w > r_l)``; ground-truth ties are skipped and a predicted tie
  (equal scores) counts as wrong (ImageReward's test accuracy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PAIR_RULES = ("best_worst", "all")


def select_pairs(scores: Tensor, group: Tensor, rule: str = "best_worst", margin: float = 0.0) -> Tensor:
    """Pairs of images of the same group (prompt): [P, 2] (chosen index, rejected index).

    ``best_worst``: per group with at least two images, its highest-scored image vs its lowest
    (first on ties), when the difference exceeds `margin`. ``all``: every ordered pair (i, j) of a
    group with ``scores[i] - scores[j] > margin`` (so margin 0 drops exact ties). Pairs are sorted
    by (chosen, rejected).

    Args:
        scores: [N] one score per image.
        group: [N] integer group (prompt) of each image.
    """
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {PAIR_RULES}, got {rule!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    scores, group = scores.detach().double().reshape(-1), group.reshape(-1)
    if scores.shape != group.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and group {tuple(group.shape)} must both be [N]")
    if not torch.isfinite(scores).all():
        raise ValueError("pair selection got NaN or infinite scores")
    same = group[:, None] == group[None, :]
    diff = scores[:, None] - scores[None, :]
    if rule == "all":
        keep = same & (diff > margin)
    else:
        n = scores.shape[0]
        idx = torch.arange(n, device=scores.device)
        # per image: is it its group's first maximum / first minimum?
        higher = same & ((diff < 0) | ((diff == 0) & (idx[None, :] < idx[:, None])))  # [i, j]: j beats i
        lower = same & ((diff > 0) | ((diff == 0) & (idx[None, :] < idx[:, None])))
        best, worst = ~higher.any(1), ~lower.any(1)
        keep = same & best[:, None] & worst[None, :] & (diff > margin)
    return keep.nonzero()


def _entropy(p: Tensor) -> Tensor:
    """Binary entropy with 0 log 0 = 0."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


def bradley_terry_loss(r_a: Tensor, r_b: Tensor, p_a: Tensor | float = 1.0, weight: Tensor | None = None) -> Tensor:
    """Pairwise preference loss, scalar.

    Per pair: ``-(p log sigmoid(d) + (1 - p) log sigmoid(-d)) - H(p)`` with ``d = r_a - r_b``, `p_a`
    the probability that a is preferred (1: a wins, 0: b wins, 0.5: a tie) and H the label's
    entropy (0 for a win, log 2 for a tie): the KL divergence of the label from the model, so a
    tie's optimum (d = 0) costs 0, as in PickScore. With `weight` [P], the weighted mean
    ``sum(w * loss) / sum(w)``; else the mean.
    """
    d = r_a - r_b
    p = torch.as_tensor(p_a, dtype=d.dtype, device=d.device).expand_as(d)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p_a must be a probability in [0, 1] (1: a wins, 0: b wins, 0.5: tie)")
    loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)) - _entropy(p)
    if weight is None:
        return loss.mean()
    weight = weight.to(loss)
    return (weight * loss).sum() / weight.sum()


def pairwise_accuracy(r_a: Tensor, r_b: Tensor, p_a: Tensor | None = None) -> float:
    """Share of pairs ranked right: a must score strictly above b where a is preferred
    (``p_a`` 1 or None) and below where b is (``p_a`` 0); ground-truth ties (0.5) are skipped and
    equal predicted scores count as wrong. NaN when no pair is left."""
    r_a, r_b = r_a.reshape(-1), r_b.reshape(-1)
    if p_a is None:
        p_a = torch.ones_like(r_a)
    p_a = p_a.reshape(-1).to(r_a)
    decided = p_a != 0.5
    if not decided.any():
        return math.nan
    right = torch.where(p_a > 0.5, r_a > r_b, r_b > r_a)
    return right[decided].double().mean().item()


def prompt_weights(group: Tensor) -> Tensor:
    """PickScore's per-example weight: 1 / (number of examples of the same prompt), [P]."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].double()
