"""The CLIP contrastive objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    acc = 0.5 * ((logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean())
    return loss, acc
