"""phi's training losses (SEARLE ``train_phi.py``), plain tensors.

L = lambda_distil * NT-Xent(OTI tokens, phi outputs; tau) + lambda_reg * L_reg   (a sum, not averaged)

NT-Xent (SEARLE's ``contrastive_loss``, after PALAVRA): with u = normalised OTI tokens and
w = normalised phi outputs (B each), J = [u; w] (2B vectors). For every row i of J its positive
is the same image's other vector; the loss is -mean_i log(exp(J_i . J_pos(i) / tau) /
sum_{j != i} exp(J_i . J_j / tau)) (the positive is part of the denominator).
L_reg = mean(1 - cos(text(phrase with every occurrence of the concept replaced by $, phi(f)),
text(phrase))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(first: Tensor, second: Tensor, temperature: float = 0.25) -> Tensor:
    """NT-Xent between two views [B, W] of B items (row i of each is the same item): a scalar."""
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(
            f"nt_xent needs two [B, W] tensors of one shape, got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = first.shape[0]
    joint = torch.cat([F.normalize(first.float(), dim=1), F.normalize(second.float(), dim=1)])  # [2B, W]
    logits = joint @ joint.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=logits.device), float("-inf"))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(logits.device)
    return F.cross_entropy(logits, positive)


def cosine_loss(a: Tensor, b: Tensor) -> Tensor:
    """mean(1 - cos(a_i, b_i)) over rows [B, D] (torch's CosineEmbeddingLoss with target 1)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()
