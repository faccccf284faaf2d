"""The contrastive objectives: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _matching_accuracy(logits: Tensor) -> Tensor:
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * ((logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean())


def clip_contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE over a batch of matching pairs.

    Args:
        image_emb: [B, D] L2-normalised; row i matches text row i.
        text_emb: [B, D] L2-normalised.
        logit_scale: scalar, the (exp'd) inverse temperature.
    Returns:
        ``(loss, accuracy)``: the mean of the image->text and text->image cross-entropies, and the
        share of rows whose argmax is the matching pair (both directions averaged).
    """
    logits = logit_scale * image_emb @ text_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    return loss, _matching_accuracy(logits)


def sigmoid_contrastive_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor
) -> tuple[Tensor, Tensor]:
    """SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023, eq. 1): every (image, text) pair is
    a binary problem, ``-1/B sum_ij log sigmoid(z_ij (t cos_ij + b))`` with z = +1 on the
    diagonal and -1 elsewhere.

    Args:
        image_emb, text_emb: [B, D] L2-normalised; row i matches text row i.
        logit_scale: scalar t (exp'd), logit_bias: scalar b.
    Returns:
        ``(loss, accuracy)``; accuracy as in `clip_contrastive_loss` (argmax of each row/column).
    """
    logits = logit_scale * image_emb @ text_emb.T + logit_bias
    sign = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    loss = -F.logsigmoid(sign * logits).sum() / logits.shape[0]
    return loss, _matching_accuracy(logits)
