"""Patch-level error localisation metrics of the TSPO head and its baselines (plain tensors).

Maps are per-patch error probabilities [N, P] in [0, 1] (the head's sigmoid, or a baseline's
badness min-max scaled per image) against binary patch targets [N, P] (the error mask mean-pooled
per patch and binarised at > 0, as HPSv2's region target).
"""

from __future__ import annotations

import torch
from torch import Tensor


def minmax_badness(goodness: Tensor) -> Tensor:
    """A goodness map [N, P] -> badness scaled to [0, 1] per image (``(max - v) / (max - min)``;
    a constant map gives zeros): a baseline's stand-in for an error probability."""
    hi, lo = goodness.amax(1, keepdim=True), goodness.amin(1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (hi - goodness) / torch.where(span > 0, span, 1), torch.zeros_like(goodness))


def patch_iou(prob: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """IoU of ``prob > threshold`` with the target per image: [N] (NaN when both are empty)."""
    pred, target = prob > threshold, target.bool()
    inter = (pred & target).sum(1).double()
    union = (pred | target).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def patch_auc(score: Tensor, target: Tensor) -> Tensor:
    """ROC AUC of the patch scores for the target per image (the Mann-Whitney statistic: the share
    of (error, clean) patch pairs ranked right, ties count one half): [N] (NaN when an image's
    patches are all error or all clean)."""
    target = target.bool()
    diff = score[:, :, None] - score[:, None, :]  # [N, P(error), P(clean)]
    pairs = target[:, :, None] & ~target[:, None, :]
    wins = ((diff > 0).double() + 0.5 * (diff == 0).double()) * pairs
    n = pairs.sum((1, 2)).double()
    return torch.where(n > 0, wins.sum((1, 2)) / n.clamp_min(1), torch.full_like(n, float("nan")))
