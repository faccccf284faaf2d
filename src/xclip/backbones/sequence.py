"""Towers that run transformer blocks over a token sequence, written once for every library.

`SequenceVisionTower`: patch tokens (after prefix tokens: class, registers) through blocks, then one
of three pooling steps:

- ``"class token"`` (OpenAI-style ViT, EVA, MobileCLIP-B): the class token's row of the last block
  is the pooling attention; the embedding is the head (final norm, projection) of the class token.
- ``"latent query"`` (SigLIP / SigLIP 2 / PE ``map`` heads, CoCa's attentional pooler): a learned
  query attends over the trunk's normalised tokens; the read-out goes through the rest of the head.
- ``"average"`` (CLIPA, timm ``avg``): the mean of the grid tokens through the head.

`SequenceTextTower`: token embeddings plus positions through blocks with the tower's own mask
(causal, padding, none), pooled at one row (EOT, the last position, an appended class token).

A library adapter subclasses them with its hooks (the embedding, the blocks as `BlockView` s, the
norms and projections).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from .base import (
    BlockTrace,
    BlockView,
    ImageTrace,
    PoolAttention,
    PoolTrace,
    TextTower,
    TextTrace,
    VisionTower,
    attention_readout,
    head_view,
    run_blocks,
)


class SequenceVisionTower(VisionTower):
    """Hooks: `prefix`, `embed`, `blocks` and, per pooling, `head` (class token), `final_norm` +
    `pool_qkv` + `pool_tail` (latent query), or `final_norm` + `pooled_head` (average)."""

    prefix: int = 1

    @abstractmethod
    def embed(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Tokens entering the first block: [N, 3, H, W] -> [N, prefix + gh*gw, W]."""

    @abstractmethod
    def blocks(self, grid: tuple[int, int]) -> list[BlockView]: ...

    def head(self, x: Tensor) -> Tensor:
        """Class-token towers: final norm and projection of a token [..., W] -> [..., D]."""
        raise NotImplementedError

    def final_norm(self, x: Tensor) -> Tensor:
        """Latent-query and average towers: the per-token transform before the pooling step."""
        raise NotImplementedError

    def pool_qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Latent-query towers: the query [N, H, dh] and keys, values [N, H, L, dh] of the pool."""
        raise NotImplementedError

    def pool_prefix(self) -> int:
        """Non-grid keys at the front of the pool's keys (the trunk's prefix tokens, if attended)."""
        return self.prefix

    def pool_keys(self, tokens: Tensor) -> Tensor:
        """The tokens the latent query attends (all, or the grid tokens only)."""
        return tokens

    def pool_tail(self, attn_out: Tensor) -> Tensor:
        """Latent-query towers: the read-out [..., W'] through the rest of the head -> [..., D]."""
        raise NotImplementedError

    def pooled_head(self, pooled: Tensor) -> Tensor:
        """Average towers: the head after the mean: [..., W] -> [..., D]."""
        raise NotImplementedError

    def grid(self, images: Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        return h // self.patch_size, w // self.patch_size

    # ---- the traced forward ------------------------------------------------------------------
    def trace(self, images: Tensor, n_blocks: int) -> ImageTrace:
        grid = self.grid(images)
        views = self.blocks(grid)
        x, traces = run_blocks(self.embed(images, grid), views, None, n_blocks)
        patch_tokens = x[:, self.prefix :]
        if self.pooling == "class token":
            pool = self._class_token_pool(views[-1], traces[-1]) if traces else None
            return ImageTrace(traces, self.head(x[:, 0]), patch_tokens, grid, pool)
        tokens = self.final_norm(x)
        if self.pooling == "average":
            pool = PoolTrace(tokens, self.prefix, self._average_forward, None)
            return ImageTrace(traces, self._average_forward(tokens), patch_tokens, grid, pool)
        attention = self._latent_attention(tokens)
        pool = PoolTrace(tokens, self.prefix, self._latent_forward, attention)
        return ImageTrace(traces, attention.tail(attention.attn_out), patch_tokens, grid, pool)

    def _latent_forward(self, tokens: Tensor) -> Tensor:
        attention = self._latent_attention(tokens)
        return attention.tail(attention.attn_out)

    def _average_forward(self, tokens: Tensor) -> Tensor:
        return self.pooled_head(tokens[:, self.prefix :].mean(1))

    def _latent_attention(self, tokens: Tensor, key_weights: Tensor | None = None) -> PoolAttention:
        q, k, v = self.pool_qkv(self.pool_keys(tokens))
        probs, out = attention_readout(q, k, v, key_weights)
        return PoolAttention(q, k, v, probs, out, self.pool_prefix(), self.pool_tail)

    def _class_token_pool(self, view: BlockView, block: BlockTrace) -> PoolTrace:
        x_cls = block.x_in[:, 0]

        def tail(attn_out: Tensor) -> Tensor:
            x = x_cls + view.ls_1(view.out_proj(attn_out))
            return self.head(x + view.ls_2(view.mlp(view.ln_2(x))))

        def forward(tokens: Tensor) -> Tensor:
            q, k, v = (head_view(t, view.num_heads) for t in view.qkv(tokens))
            return tail(attention_readout(q[:, :, 0], k, v)[1])

        attention = PoolAttention(
            block.q_heads[:, :, 0],
            block.k_heads,
            block.v_heads,
            block.attn_weights[:, :, 0],
            block.attn_out[:, 0],
            self.prefix,
            tail,
        )
        return PoolTrace(view.ln_1(block.x_in), self.prefix, forward, attention)

    # ---- dense features ----------------------------------------------------------------------
    def patch_features(self, trace: ImageTrace) -> Tensor:
        if self.pooling == "class token":
            return self.head(trace.patch_tokens)
        if self.pooling == "average":
            return self.pooled_head(self.final_norm(trace.patch_tokens))
        attention = trace.pool_attention()
        _, v_grid = attention.grid_keys()
        return attention.tail(v_grid.transpose(1, 2).flatten(2))  # each token's value as the read-out

    def region_embedding(self, trace: ImageTrace, weights: Tensor) -> Tensor:
        w = weights.to(trace.patch_tokens.dtype)
        if self.pooling == "latent query":
            attention = trace.pool_attention()
            keys = torch.cat([w.new_zeros(w.shape[0], attention.prefix), w], dim=1)
            return attention.tail(attention_readout(attention.q, attention.k, attention.v, keys)[1])
        mean = torch.einsum("np,npw->nw", w, trace.patch_tokens) / w.sum(1, keepdim=True).clamp_min(1e-12)
        if self.pooling == "class token":
            return self.head(mean)
        return self.pooled_head(self.final_norm(mean))

    def image_head(self, tokens: Tensor) -> Tensor:
        if self.pooling != "class token":
            return super().image_head(tokens)
        return self.head(tokens)


class SequenceTextTower(TextTower):
    """Hooks: `token_embedding`, `embed` (positions, appended tokens, the mask), `blocks`,
    `pool_index`, `head` (pool, final norm, projection)."""

    @abstractmethod
    def embed(self, token_embeds: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Token embeddings [K, L, W] -> (tokens entering the first block [K, L', W], the additive
        mask broadcastable to [K, H, L', L'] or None)."""

    @abstractmethod
    def blocks(self) -> list[BlockView]: ...

    @abstractmethod
    def head(self, x: Tensor, pool_index: Tensor) -> Tensor:
        """The last block's output [K, L', W] pooled at `pool_index` [K], normed, projected -> [K, D]."""

    def encode_embeddings(self, token_embeds: Tensor, tokens: Tensor, n_blocks: int) -> TextTrace:
        x, mask = self.embed(token_embeds, tokens)
        x, traces = run_blocks(x, self.blocks(), mask, n_blocks)
        index = self.pool_index(tokens)
        return TextTrace(traces, self.head(x, index), index, tokens, attn_mask=mask)
