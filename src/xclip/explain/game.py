"""Chefer et al. (ICCV 2021), "Generic attention-model explainability" (GAME), CLIP version:
gradient-weighted attention rollout over the blocks from `start_layer` on.

Per block i >= start_layer: ``cam = mean_heads (grad_attn * attn).clamp(min=0)``,
``R = R + cam @ R`` from the identity; the image map is ``R[CLS, patches]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xclip.explain.base import Explainer, Texts, explaining, per_text_gradients
from xclip.explain.targets import Target, resolve_target


def rollout(attentions: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Gradient-weighted rollout.

    attentions: per block [N, H, L, L]; grads: per block [N, K, H, L, L] (one per target)
    -> relevance R [N, K, L, L].
    """
    n, kk, _, length, _ = grads[0].shape
    relevance = torch.eye(length, dtype=grads[0].dtype, device=grads[0].device).expand(n, kk, length, length)
    for attn, grad in zip(attentions, grads):
        cam = (grad * attn[:, None]).clamp_min(0).mean(dim=2)  # [N, K, L, L]
        relevance = relevance + cam @ relevance
    return relevance


class GAME(Explainer):
    """``GAME(backbone, start_layer=-1).image_maps(images, texts) -> [N, K, gh, gw]``.

    Args:
        start_layer: first block of the rollout; negative counts from the end (-1 = the last
            block only, the default of the authors' CLIP notebook).
        precision: autocast precision (``"bf16-mixed"``, ...; see `Explainer`).
    """

    name = "game"

    def __init__(self, backbone, start_layer: int = -1, precision: str | int | None = None):
        super().__init__(backbone, precision)
        self.start_layer = start_layer

    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        target_fn = resolve_target(target)
        depth = len(self.backbone.vision_blocks())
        start = self.start_layer + depth if self.start_layer < 0 else self.start_layer
        if not 0 <= start < depth:
            raise ValueError(f"start_layer {self.start_layer} is outside the {depth} vision blocks")
        gh, gw = self.backbone.patch_grid(images)
        with explaining(self.backbone.model), torch.enable_grad():
            text_emb = self.text_embeddings(texts)
            trace = self.backbone.trace_image(images.to(self.backbone.device), n_blocks=depth - start)
            attentions = [b.attn_weights for b in trace.blocks]
            grads = per_text_gradients(target_fn(trace.embedding, text_emb), attentions, pairs)  # each [K, N, H, L, L]
            relevance = rollout([a.detach() for a in attentions], [g.transpose(0, 1) for g in grads])
        return relevance[:, :, 0, 1:].reshape(images.shape[0], -1, gh, gw)
