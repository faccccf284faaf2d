"""Chefer et al. (ICCV 2021), "Generic attention-model explainability" (GAME), CLIP version:
gradient-weighted attention rollout over the attention layers from `start_layer` on.

Per block i >= start_layer: ``cam = mean_heads (grad_attn * attn).clamp(min=0)``,
``R = R + cam @ R`` from the identity; for a class-token ViT the image map is ``R[CLS, patches]``.

The last attention layer is the pooling attention. For a class-token ViT it is the last block; for
an attention-pool head (SigLIP, PE, CoCa) the learned query's attention comes after the trunk's
blocks, and its row ``cam_pool`` (one query, not a token of the sequence) reads the rollout of the
blocks before it: map = ``(cam_pool @ R)[patches]``; ResNet's attention pool has no attention
before it (map = ``cam_pool[patches]``). Average-pooled towers have no attention to roll out and
are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones.base import UnsupportedFamily
from xclip.explain.base import Explainer, Texts, explaining, per_text_gradients
from xclip.explain.targets import Target


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
        start_layer: first attention layer of the rollout; negative counts from the end (-1 = the
            pooling attention only, the default of the authors' CLIP notebook).
        precision: autocast precision (``"bf16-mixed"``, ...; see `Explainer`).
    """

    name = "game"

    def __init__(self, backbone, start_layer: int = -1, precision: str | int | None = None):
        super().__init__(backbone, precision)
        self.start_layer = start_layer

    def _depth(self) -> tuple[int, bool]:
        """(number of attention layers ending with the pooling attention, whether the pool is a
        class-token row of the last block)."""
        vision = self.backbone.vision
        if not vision.has_attention_pool:
            raise vision.refusal("GAME", "GradCAM(backbone) (Grad-CAM on the last feature map)")
        try:
            blocks = len(self.backbone.vision_blocks())
        except UnsupportedFamily:
            blocks = 0  # ResNet: its only attention is the attention pool
        cls = vision.pooling == "class token"
        return (blocks if cls else blocks + 1), cls

    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        target_fn = self.target_fn(target)
        depth, cls = self._depth()
        start = self.start_layer + depth if self.start_layer < 0 else self.start_layer
        if not 0 <= start < depth:
            raise ValueError(
                f"start_layer {self.start_layer} is outside the {depth} attention layers "
                f"of {self.backbone.vision.family}"
            )
        n_layers = depth - start
        with explaining(self.backbone.model), torch.enable_grad():
            text_emb = self.text_embeddings(texts)
            trace = self.backbone.trace_image(
                images.to(self.backbone.device), n_blocks=n_layers if cls else n_layers - 1
            )
            block_attn = [b.attn_weights for b in trace.blocks]
            if cls:
                grads = per_text_gradients(target_fn(trace.embedding, text_emb), block_attn, pairs)  # [K, N, H, L, L]
                relevance = rollout([a.detach() for a in block_attn], [g.transpose(0, 1) for g in grads])
                return relevance[:, :, 0, trace.traced_pool().prefix :].reshape(images.shape[0], -1, *trace.grid)
            attention = trace.pool_attention()
            probs = attention.probs if attention.probs.requires_grad else attention.probs.detach().requires_grad_(True)
            emb = attention.tail(torch.einsum("nhl,nhld->nhd", probs, attention.v).flatten(1))
            grads = per_text_gradients(target_fn(emb, text_emb), [*block_attn, probs], pairs)
            grads = [g.transpose(0, 1) for g in grads]
            cam = (grads[-1] * probs.detach()[:, None]).clamp_min(0).mean(dim=2)  # [N, K, keys]
            if block_attn:
                relevance = rollout([a.detach() for a in block_attn], grads[:-1])  # [N, K, L, L]
                missing = relevance.shape[-1] - cam.shape[-1]  # trunk prefix tokens the pool does not attend
                cam = (F.pad(cam, (missing, 0))[:, :, None] @ relevance)[:, :, 0]
                prefix = trace.traced_pool().prefix
            else:
                prefix = attention.prefix
            return cam[:, :, prefix:].reshape(images.shape[0], -1, *trace.grid)
