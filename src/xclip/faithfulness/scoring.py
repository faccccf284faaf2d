"""TiPAI faithfulness scores of images against their prompts (plain tensors, no Lightning).

- global: cosine(prompt embedding, image embedding), one number per image;
- ``crops``: every cell of a G x G grid cropped, resized to the model input and embedded (all
  cells of all images in batches of `crop_batch_size`); a cell's score is its crop's cosine with
  the prompt (G*G forward passes per image);
- ``dense``: one traced forward per image gives the image embedding (the global score), the patch
  tokens (their cosine with the prompt after the model's own final norm and projection, on the
  ViT grid) and, reusing that pass, the prompt's Grad-ECLIP map; both maps are area-resampled to
  the G x G cells. ``dense`` is the patch-token similarity (`Backbone.patch_features`: for an
  attention-pool head each token's value through the head) and ``dense_gradeclip`` the Grad-ECLIP
  evidence map (Grad-CAM on the last feature map for towers that pool by averaging: ConvNeXt,
  FastViT, Swin, ViTamin, CLIPA have no pooling query for Grad-ECLIP).

Every patch map here is a *goodness* map (high = the prompt is matched there); `badness` turns
one into the non-negative map the localisation metrics compare with an error mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone
from xclip.backbones.base import ImageTrace
from xclip.explain import GradCAM, GradECLIP, explaining
from xclip.explain.base import autocast
from xclip.explain.gradeclip import combine_terms
from xclip.faithfulness.grid import crop_cells, resample_to_cells

METHODS = ("crops", "dense")
# what each method writes: a method name -> the patch maps it produces
METHOD_MAPS = {"crops": ("crops",), "dense": ("dense", "dense_gradeclip")}


@dataclass
class TiPAIScores:
    """Scores of N images: ``global_score`` [N] (cosine with the image's prompt), ``maps``: map name
    -> [N, G, G] goodness per cell, and the dense pass's ``trace`` (for a head reading the same
    features; None when ``dense`` was not run)."""

    global_score: Tensor
    maps: dict[str, Tensor] = field(default_factory=dict)
    trace: ImageTrace | None = None


def badness(goodness: Tensor) -> Tensor:
    """A goodness map [N, G, G] -> a non-negative badness map: ``max - value`` per image (0 at the
    best cell, largest at the worst); a constant map gives all zeros."""
    flat = goodness.flatten(1)
    return (flat.amax(1, keepdim=True) - flat).view_as(goodness)


def worst_cell(goodness: Tensor) -> Tensor:
    """Row-major index of each map's lowest cell: [N, G, G] -> [N] (first one on ties)."""
    return goodness.flatten(1).argmin(1)


class TiPAIScorer:
    """Global and patch faithfulness scores for any xclip backbone.

    Args:
        backbone: the CLIP model (kept frozen, eval mode while scoring).
        grid: G, the cells per side of the patch grid.
        methods: any of ``("crops", "dense")``.
        crop_batch_size: crops embedded per forward.
        precision: autocast precision (``"bf16-mixed"``, ``"16-mixed"``, ``"32"`` or None).
    """

    def __init__(
        self,
        backbone: Backbone,
        grid: int = 7,
        methods: Sequence[str] = METHODS,
        crop_batch_size: int = 256,
        precision: str | None = None,
    ):
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1 cell per side, got {grid}")
        if crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be >= 1, got {crop_batch_size}")
        self.backbone, self.grid, self.methods = backbone, int(grid), tuple(methods)
        self.crop_batch_size, self.precision = int(crop_batch_size), precision
        self.explainer = (
            GradECLIP(backbone, precision=precision)
            if backbone.vision.has_attention_pool
            else GradCAM(backbone, precision=precision)
        )

    @property
    def map_names(self) -> tuple[str, ...]:
        return tuple(name for m in self.methods for name in METHOD_MAPS[m])

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """K prompts -> [K, D] L2-normalised (empty prompts refused)."""
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise ValueError(f"prompts {empty} are empty: every image needs a non-empty prompt")
        with torch.no_grad(), explaining(self.backbone), autocast(self.backbone.device, self.precision):
            return self.backbone.encode_texts(list(prompts), normalize=True).float()

    def score(self, images01: Tensor, text_emb: Tensor) -> TiPAIScores:
        """Images [N, 3, H, W] in [0, 1] and each image's prompt embedding [N, D] -> `TiPAIScores`."""
        _check_images(images01)
        if text_emb.shape[0] != images01.shape[0]:
            raise ValueError(f"{images01.shape[0]} images but {text_emb.shape[0]} prompt embeddings (one per image)")
        images01 = images01.to(self.backbone.device)
        text_emb = F.normalize(text_emb.to(self.backbone.device).float(), dim=-1)
        out = TiPAIScores(global_score=torch.empty(0))
        if "dense" in self.methods:
            out = self.dense(images01, text_emb)
        if "crops" in self.methods:
            out.maps["crops"] = self.crops(images01, text_emb)
            if out.trace is None:
                out.global_score = self.global_scores(images01, text_emb)
        return out

    def global_scores(self, images01: Tensor, text_emb: Tensor) -> Tensor:
        """cosine(prompt, image): [N]."""
        with torch.no_grad(), explaining(self.backbone), autocast(self.backbone.device, self.precision):
            emb = self.backbone.encode_image(self.backbone.normalize(images01), normalize=True).float()
        return (emb * text_emb).sum(-1)

    def crops(self, images01: Tensor, text_emb: Tensor) -> Tensor:
        """Crop scores [N, G, G]: cosine of each cell's crop (resized to the model input) with the
        image's prompt. Images are cut into crops a chunk at a time so that at most
        `crop_batch_size` crops exist at once."""
        g, size = self.grid, self.backbone.image_size
        per_chunk = max(1, self.crop_batch_size // (g * g))
        scores = []
        with torch.no_grad(), explaining(self.backbone), autocast(self.backbone.device, self.precision):
            for start in range(0, images01.shape[0], per_chunk):
                cells = crop_cells(images01[start : start + per_chunk], g, size)  # [n, G*G, 3, S, S]
                n = cells.shape[0]
                emb = self.backbone.encode_image(self.backbone.normalize(cells.flatten(0, 1)), normalize=True).float()
                scores.append((emb.view(n, g * g, -1) * text_emb[start : start + n, None]).sum(-1))
        return torch.cat(scores).view(-1, g, g)

    def dense(self, images01: Tensor, text_emb: Tensor) -> TiPAIScores:
        """One traced forward: the global score, the patch-token similarity and the Grad-ECLIP map
        (reusing the pass), both maps resampled to [N, G, G]."""
        h, w = images01.shape[-2:]
        size = (h, w)
        # validation runs under inference_mode; Grad-ECLIP's vector-Jacobian product needs autograd
        with torch.inference_mode(False), explaining(self.backbone):
            x = self.backbone.normalize(images01.clone())
            t = text_emb.clone()
            with torch.no_grad(), autocast(self.backbone.device, self.precision):
                trace = self.backbone.trace_image(x, n_blocks=1)
                image_emb = F.normalize(trace.embedding.float(), dim=-1)
                patches = F.normalize(self.backbone.patch_features(trace).float(), dim=-1)  # [N, P, D]
            similarity = (patches * t[:, None]).sum(-1).unflatten(1, trace.grid)
            if isinstance(self.explainer, GradECLIP):
                terms = self.explainer.terms(x, t, pairs=True, trace=trace)
                evidence = combine_terms(terms.spatial, terms.channel)[:, 0]
            else:
                evidence = self.explainer.maps_from_trace(trace, t, pairs=True)[:, 0]
        maps = {
            "dense": resample_to_cells(similarity.double(), self.grid, size).float(),
            "dense_gradeclip": resample_to_cells(evidence.double(), self.grid, size).float(),
        }
        return TiPAIScores(global_score=(image_emb * t).sum(-1), maps=maps, trace=trace)


def _check_images(images01: Tensor) -> None:
    if not isinstance(images01, Tensor) or images01.ndim != 4 or images01.shape[1] != 3:
        shape = tuple(images01.shape) if isinstance(images01, Tensor) else type(images01).__name__
        raise ValueError(f"images must be a float tensor [N, 3, H, W] in [0, 1], got {shape}")
    if not images01.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1], got dtype {images01.dtype} (divide uint8 images by 255)")
    if images01.numel() and (images01.min() < 0 or images01.max() > 1 or not torch.isfinite(images01).all()):
        raise ValueError("images must hold finite values in [0, 1] (normalisation for the model is the scorer's job)")
