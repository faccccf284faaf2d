"""Grad-CAM for CLIP's vision transformer.

On CLIP the *output* of the last block gets zero gradient at the patch tokens (only the CLS token
reaches the embedding), so a CAM there is all zeros. The activations explained here are the last
block's ``ln_1`` output (default) or its input: their patch tokens reach the embedding through
the CLS query's attention. Only the CLS row is computed after them, so the gradient crosses the
last block alone, for the whole batch and all K targets in one batched backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xclip.backbones.base import BlockView
from xclip.explain.base import Explainer, Texts, explaining, per_text_gradients
from xclip.explain.targets import Target, resolve_target

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
        layer: ``"ln_1"`` (the last block's ln_1 output) or ``"block_input"`` (the output of the
            block before it).
        precision: autocast precision (``"bf16-mixed"``, ...; see `Explainer`).
    """

    name = "grad_cam"

    def __init__(self, backbone, layer: str = "ln_1", precision: str | int | None = None):
        super().__init__(backbone, precision)
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        self.layer = layer

    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        with explaining(self.backbone.model), torch.no_grad():
            x_in = self.backbone.trace_image(images.to(self.backbone.device), n_blocks=1).blocks[-1].x_in
        return self.maps_from_block_input(x_in, texts, target, pairs, grid=self.backbone.patch_grid(images))

    def maps_from_block_input(self, x_in: Tensor, texts: Texts, target: str | Target = "cosine",
                              pairs: bool = False, grid: tuple[int, int] | None = None) -> Tensor:
        """Maps from the last block's input x_in [N, 1 + gh*gw, W] of a forward already run
        (``trace_image(images, 1).blocks[-1].x_in``): [N, K, gh, gw], or [N, 1, gh, gw] with image n
        explained for text n when `pairs`. Only the last block's CLS row is recomputed, so a caller
        that also needs the forward's patch tokens or embedding runs the vision tower once.
        `grid`: the images' patch grid (default: the model's own, `backbone.grid_size`)."""
        target_fn = resolve_target(target)
        view = self.backbone.vision_blocks()[-1]
        gh, gw = grid or self.backbone.grid_size
        if gh * gw != x_in.shape[1] - 1:
            raise ValueError(f"x_in has {x_in.shape[1] - 1} patch tokens, not a {gh}x{gw} grid: pass grid=")
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
            cam = cam_from_gradients(acts.detach()[:, 1:], grads.transpose(0, 1)[:, :, 1:])
        return cam.reshape(x_in.shape[0], -1, gh, gw)

    def _cls_forward(self, view: BlockView, x_cls: Tensor, normed: Tensor) -> Tensor:
        """The last block from its ln_1 output, computing the CLS row only: -> [N, D]."""
        n, length, width = normed.shape
        heads = view.num_heads
        q, k, v = (t.view(n, length, heads, width // heads).transpose(1, 2) for t in view.qkv(normed))
        probs = ((q[:, :, :1] * (width // heads) ** -0.5) @ k.transpose(-1, -2)).softmax(-1)  # [N, H, 1, L]
        attn_cls = (probs @ v).reshape(n, width)
        x = x_cls + view.ls_1(view.out_proj(attn_cls))
        x = x + view.ls_2(view.mlp(view.ln_2(x)))
        return self.backbone.image_head(x)
