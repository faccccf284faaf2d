"""Fusions of the projected image and text towers, chosen by name (`FUSIONS`).

Every fusion takes the two modalities already projected to the fusion width ``d``: pooled
vectors [B, d] and token sequences [B, L, d] with validity masks [B, L], and returns [B, d].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xclip.distill.towers import TowerOutput


class ConcatMLPFusion(nn.Module):
    """``MLP([image; text])``: concatenated pooled vectors through Linear-GELU-Dropout-Linear."""

    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or 2 * dim
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: TowerOutput, text: TowerOutput) -> Tensor:
        return self.norm(self.mlp(torch.cat([image.pooled, text.pooled], dim=-1)))


class CrossAttentionBlock(nn.Module):
    """One pre-norm cross-attention layer: queries attend over a key/value sequence, then an MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, query: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        kv = self.norm_kv(keys)
        attended, _ = self.attn(self.norm_q(query), kv, kv, key_padding_mask=~key_mask, need_weights=False)
        query = query + attended
        return query + self.mlp(self.norm_mlp(query))


class CrossAttentionFusion(nn.Module):
    """The pooled image vector attends over the text tokens and the pooled text vector over the
    image tokens (`layers` layers of `heads` heads each way); the two results are concatenated and
    projected back to ``d``."""

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion width {dim} is not divisible by heads={heads}")
        if layers < 1:
            raise ValueError(f"cross-attention needs layers >= 1, got {layers}")
        self.image_to_text = nn.ModuleList(CrossAttentionBlock(dim, heads, dropout) for _ in range(layers))
        self.text_to_image = nn.ModuleList(CrossAttentionBlock(dim, heads, dropout) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim))

    def forward(self, image: TowerOutput, text: TowerOutput) -> Tensor:
        q_img, q_txt = image.pooled.unsqueeze(1), text.pooled.unsqueeze(1)
        for to_text, to_image in zip(self.image_to_text, self.text_to_image):
            q_img, q_txt = to_text(q_img, text.tokens, text.mask), to_image(q_txt, image.tokens, image.mask)
        return self.out(torch.cat([q_img[:, 0], q_txt[:, 0]], dim=-1))


class GatedFusion(nn.Module):
    """A gated multimodal unit: ``g = sigmoid(W [i; t])`` per feature, ``g * tanh(i) + (1 - g) * tanh(t)``."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: TowerOutput, text: TowerOutput) -> Tensor:
        i, t = image.pooled, text.pooled
        g = torch.sigmoid(self.gate(torch.cat([i, t], dim=-1)))
        return self.norm(self.dropout(g * torch.tanh(i) + (1 - g) * torch.tanh(t)))


FUSIONS: dict[str, type[nn.Module]] = {
    "concat": ConcatMLPFusion,
    "cross_attention": CrossAttentionFusion,
    "gated": GatedFusion,
}


def build_fusion(name: str, dim: int, **options) -> nn.Module:
    """The fusion `name` (``concat``, ``cross_attention``, ``gated``) at width `dim` with its
    options (``heads``, ``layers``, ``hidden``, ``dropout``)."""
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose from {sorted(FUSIONS)}")
    return FUSIONS[name](dim, **options)
