"""NegAlign's image side in one forward: embedding, CAM foreground and background embedding.

:class:`NegAlignFeatures` runs the vision tower once per batch (the pooling step traced), takes the
Grad-CAM of each image's predicted ID class on the tokens the pooling step reads (a ViT's last
block's ``ln_1``: there the patch tokens get non-zero gradients, at the block's output they get
none; SigLIP's normalised trunk output; a ConvNeXt's last feature map), and embeds the same
forward's background (the grid cells outside the CAM foreground) with `Backbone.region_embedding`:
for a class-token ViT the image head (``ln_post`` then ``proj``) of the mean background token, for
an attention-pool head its read-out restricted to the background. The CAM's gradient crosses only
the pooling step, so the whole batch costs one forward plus one small backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xclip.backbones.base import Backbone
from xclip.explain.base import explaining
from xclip.explain.gradcam import GradCAM
from xclip.ood.negalign import background_embedding, foreground_mask


@dataclass
class ImageFeatures:
    """Per-image outputs of one batch (N images, D embedding dims, gh x gw patch grid).

    image_emb [N, D] and bg_emb [N, D] un-normalised; pred_class [N] long (most similar ID class);
    cam [N, gh, gw] raw Grad-CAM; fg_mask [N, gh, gw] bool (dilated foreground); cam_valid [N]
    bool (the CAM had a finite non-zero patch); bg_fell_back [N] bool (no background patch left,
    the background is the mean of all patches).
    """

    image_emb: Tensor
    bg_emb: Tensor
    pred_class: Tensor
    cam: Tensor
    fg_mask: Tensor
    cam_valid: Tensor
    bg_fell_back: Tensor


class NegAlignFeatures(nn.Module):
    """``forward(images [N,3,S,S] model-ready, id_emb [C, D]) -> ImageFeatures``, batched.

    Args:
        backbone: any xclip :class:`Backbone` (its ``trace_image`` and ``region_embedding`` are used).
        percentile, dilation: :func:`foreground_mask` settings (NegAlign: 80 and 1 patch).
    """

    def __init__(self, backbone: Backbone, percentile: float = 80.0, dilation: int = 1):
        super().__init__()
        self.backbone = backbone
        self.cam = GradCAM(backbone, layer="ln_1")
        self.percentile, self.dilation = percentile, dilation

    def forward(self, images: Tensor, id_emb: Tensor) -> ImageFeatures:
        bb = self.backbone
        id_emb = id_emb.to(bb.device).float()
        with explaining(bb.model), torch.no_grad():
            trace = bb.trace_image(images.to(bb.device), n_blocks=1)
        image_emb = trace.embedding.detach().float()
        pred = (F.normalize(image_emb, dim=-1) @ F.normalize(id_emb, dim=-1).T).argmax(dim=1)
        # one plain backward: image n differentiates cos(emb_n, T(c_hat_n)) only
        cam = self.cam.maps_from_trace(trace, id_emb[pred], "cosine", pairs=True)[:, 0]
        fg, valid = foreground_mask(cam, self.percentile, self.dilation)
        with explaining(bb.model), torch.no_grad():
            bg_emb, fell_back = background_embedding(fg, lambda weights: bb.region_embedding(trace, weights))
        return ImageFeatures(image_emb, bg_emb.float(), pred, cam.detach(), fg, valid, fell_back)
