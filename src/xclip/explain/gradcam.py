"""Grad-CAM for every CLIP image tower, on the activations its pooling step reads.

On a CLIP ViT the *output* of the last block gets zero gradient at the patch tokens (only the class
token reaches the embedding), so a CAM there is all zeros. The activations explained here are the
tokens the pooling step reads (`xclip.backbones.PoolTrace.tokens`):

- class-token ViTs (OpenAI-style, EVA, HF CLIP): the last block's ``ln_1`` output (default) or its
  input (``layer="block_input"``); their patch tokens reach the embedding through the class token's
  attention. Only the class-token row is computed after them;
- attention-pool heads (SigLIP, SigLIP 2, PE, CoCa): the trunk's normalised output that the learned
  query attends over; ResNet: the last feature map its mean-token attention pool reads;
- average-pooled towers (ConvNeXt, FastViT / MobileCLIP-S, Swin, ViTamin, CLIPA): the last feature
  map (stage output) before the global average, i.e. the classic Grad-CAM layer.

The gradient crosses the pooling step alone, for the whole batch and all K targets in one batched
backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xclip.backbones.base import (
    BlockView,
    ImageTrace,
    UnsupportedFamily,
    attention_readout,
    head_view,
)
from xclip.backbones.sequence import SequenceVisionTower
from xclip.explain.base import Explainer, Texts, explaining, per_text_gradients
from xclip.explain.targets import Target

LAYERS = ("ln_1", "block_input")


def cam_from_gradients(activations: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM over tokens: weights = mean gradient over the tokens, cam = ReLU(sum_c w_c A_c).

    activations [N, J, C], grads [N, K, J, C] -> [N, K, J].
    """
    weights = grads.mean(dim=2)  # [N, K, C]
    return torch.einsum("nkc,njc->nkj", weights, activations).clamp_min(0)


class GradCAM(Explainer):
    """``GradCAM(backbone, layer="ln_1").image_maps(images, texts) -> [N, K, gh, gw]``.

    Args:
        layer: ``"ln_1"``: the tokens the pooling step reads (see the module docstring; a ViT's last
            block's ln_1 output), or ``"block_input"`` (class-token ViTs only: the last block's input).
        precision: autocast precision (``"bf16-mixed"``, ...; see `Explainer`).
    """

    name = "grad_cam"

    def __init__(self, backbone, layer: str = "ln_1", precision: str | int | None = None):
        super().__init__(backbone, precision)
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if layer == "block_input" and backbone.vision.pooling != "class token":
            raise UnsupportedFamily(
                f"GradCAM(layer='block_input') is not available for {backbone.vision.family}: "
                "it has no class-token block; use GradCAM(backbone) (the pooling step's input)"
            )
        self.layer = layer

    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        with explaining(self.backbone.model), torch.no_grad():
            trace = self.backbone.trace_image(images.to(self.backbone.device), n_blocks=1)
        return self.maps_from_trace(trace, texts, target, pairs)

    def maps_from_trace(
        self, trace: ImageTrace, texts: Texts, target: str | Target = "cosine", pairs: bool = False
    ) -> Tensor:
        """Maps from a forward already run (``backbone.trace_image(images, 1)``, no graph needed):
        [N, K, gh, gw], or [N, 1, gh, gw] with image n explained for text n when `pairs`. Only the
        pooling step is recomputed, so a caller that also needs the forward's patch tokens or
        embedding runs the image tower once."""
        if self.layer == "block_input":
            return self.maps_from_block_input(trace.blocks[-1].x_in, texts, target, pairs, grid=trace.grid)
        if trace.pool is None:
            raise ValueError("the trace has no pooling step: trace the images with n_blocks >= 1")
        target_fn = self.target_fn(target)
        pool = trace.pool
        with explaining(self.backbone.model):
            text_emb = self.text_embeddings(texts)
            with torch.enable_grad():
                acts = pool.tokens.detach().requires_grad_(True)
                (grads,) = per_text_gradients(target_fn(pool.forward(acts), text_emb), [acts], pairs)  # [K, N, L, C]
            p = pool.prefix
            cam = cam_from_gradients(acts.detach()[:, p:], grads.transpose(0, 1)[:, :, p:])
        return cam.reshape(acts.shape[0], -1, *trace.grid)

    def maps_from_block_input(
        self,
        x_in: Tensor,
        texts: Texts,
        target: str | Target = "cosine",
        pairs: bool = False,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """Class-token ViTs: maps from the last block's input x_in [N, 1 + gh*gw, W] of a forward
        already run (``trace_image(images, 1).blocks[-1].x_in``): [N, K, gh, gw] (or [N, 1, gh, gw]
        with `pairs`). Only the last block's class-token row is recomputed. `grid`: the images'
        patch grid (default: the model's own, `backbone.grid_size`)."""
        vision = self.backbone.vision
        if vision.pooling != "class token" or not isinstance(vision, SequenceVisionTower):
            raise UnsupportedFamily(
                f"maps_from_block_input needs a class-token ViT, not {self.backbone.vision.family}: "
                "use maps_from_trace(backbone.trace_image(images, 1), texts)"
            )
        target_fn = self.target_fn(target)
        view = self.backbone.vision_blocks()[-1]
        prefix = vision.prefix
        gh, gw = grid or self.backbone.grid_size
        if gh * gw != x_in.shape[1] - prefix:
            raise ValueError(f"x_in has {x_in.shape[1] - prefix} patch tokens, not a {gh}x{gw} grid: pass grid=")
        x_in = x_in.detach()
        with explaining(self.backbone.model):
            text_emb = self.text_embeddings(texts)
            with torch.enable_grad():
                if self.layer == "ln_1":
                    acts = view.ln_1(x_in).detach().requires_grad_(True)
                    emb = self._cls_forward(view, x_in[:, 0], acts)
                else:
                    acts = x_in.clone().requires_grad_(True)
                    emb = self._cls_forward(view, acts[:, 0], view.ln_1(acts))
                (grads,) = per_text_gradients(target_fn(emb, text_emb), [acts], pairs)  # [K, N, L, C]
            cam = cam_from_gradients(acts.detach()[:, prefix:], grads.transpose(0, 1)[:, :, prefix:])
        return cam.reshape(x_in.shape[0], -1, gh, gw)

    def _cls_forward(self, view: BlockView, x_cls: Tensor, normed: Tensor) -> Tensor:
        """The last block from its ln_1 output, computing the class-token row only: -> [N, D]."""
        q, k, v = (head_view(t, view.num_heads) for t in view.qkv(normed))
        attn_cls = attention_readout(q[:, :, 0], k, v)[1]
        x = x_cls + view.ls_1(view.out_proj(attn_cls))
        x = x + view.ls_2(view.mlp(view.ln_2(x)))
        return self.backbone.image_head(x)
