"""Captum's Integrated Gradients on a multimodal model: ``IntegratedGradients`` over the pixel
values (the text held fixed) and ``LayerIntegratedGradients`` over the output of the text
embedding layer (the image held fixed), with the completeness delta of each path per sample.

Baselines: the image path starts from a constant image (`image_baseline` in [0, 1], black by
default, through the model's normalisation); the text path from the same ids with every
non-special token replaced by [PAD] (``[CLS] [PAD] ... [PAD] [SEP]``, the attention mask kept),
so position and type embeddings are shared by both ends of the path.
``internal_batch_size`` bounds how many of the ``n_steps x N`` interpolated rows go through the
model at once (memory), without changing the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xclip.explain.base import autocast, autocast_dtype, explaining
from xclip.explain.multimodal import (
    SPECIAL_TOKENS,
    MultimodalAttribution,
    MultimodalInputs,
    MultimodalTarget,
    explained_classes,
)


def text_baseline_ids(inputs: MultimodalInputs) -> Tensor:
    """[N, T] ids with every token that is not special ([CLS], [SEP], padding) replaced by [PAD]."""
    keep = torch.tensor(
        [[tok in SPECIAL_TOKENS for tok in row] for row in inputs.tokens],
        dtype=torch.bool,
        device=inputs.input_ids.device,
    ).reshape(inputs.input_ids.shape)
    return torch.where(keep, inputs.input_ids, torch.full_like(inputs.input_ids, inputs.pad_token_id))


class CaptumExplainer:
    """Integrated Gradients of one output head (`target`): pixels with ``IntegratedGradients``,
    the text embedding layer with ``LayerIntegratedGradients``.

    Args:
        target: the model head (`MultimodalTarget`).
        n_steps: Captum's integration steps.
        method: Captum's integration rule (``gausslegendre``, ``riemann_trapezoid``...).
        internal_batch_size: rows per forward pass inside Captum (None: all ``n_steps x N`` at once).
        image_baseline: the constant [0, 1] value of the baseline image.
        precision: autocast precision of the forward passes (None: fp32).
    """

    name = "integrated_gradients"

    def __init__(
        self,
        target: MultimodalTarget,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        image_baseline: float = 0.0,
        precision: str | None = None,
    ):
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if internal_batch_size is not None and internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be >= 1 or None, got {internal_batch_size}")
        if not 0.0 <= image_baseline <= 1.0:
            raise ValueError(f"image_baseline is a [0, 1] pixel value, got {image_baseline}")
        autocast_dtype(precision)
        self.target, self.n_steps, self.method = target, int(n_steps), method
        self.internal_batch_size, self.image_baseline = internal_batch_size, float(image_baseline)
        self.precision = None if precision is None else str(precision)

    def _forward(self, pixel_values: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        with autocast(pixel_values.device, self.precision):
            return self.target.forward_ids(pixel_values, input_ids, mask).float()

    def explain(self, inputs: MultimodalInputs, classes: str | Tensor | None = "predicted") -> MultimodalAttribution:
        """Attributions of `inputs` (N samples) for `classes` (``"predicted"``, a [N] tensor, or
        None for every output): image [N, 3, H, W, K'] from IG, tokens [N, T, D, K'] from LayerIG
        (float64), with ``deltas["image"]`` / ``deltas["text"]`` [N, K'] per path."""
        from captum.attr import IntegratedGradients, LayerIntegratedGradients

        with explaining(self.target.module), torch.inference_mode(False), torch.enable_grad():
            pv = inputs.pixel_values.detach().float().clone()
            ids, mask = inputs.input_ids.detach().clone(), inputs.attention_mask.detach().clone()
            base_pv = self.target.pixel_values(torch.full_like(inputs.images01.float(), self.image_baseline)).detach()
            base_ids = text_baseline_ids(inputs)
            with torch.no_grad():
                output = self._forward(pv, ids, mask)
                ref_image = self._forward(base_pv, ids, mask)
                ref_text = self._forward(pv, base_ids, mask)
            cls = explained_classes(classes, output)
            ig = IntegratedGradients(lambda p, i, m: self._forward(p, i, m))
            lig = LayerIntegratedGradients(lambda i, p, m: self._forward(p, i, m), self.target.embedding_layer)
            images, tokens, d_img, d_txt = [], [], [], []
            for slot in range(cls.shape[1]):
                common = {
                    "target": cls[:, slot],
                    "n_steps": self.n_steps,
                    "method": self.method,
                    "internal_batch_size": self.internal_batch_size,
                    "return_convergence_delta": True,
                }
                a_img, delta_img = ig.attribute(pv, baselines=base_pv, additional_forward_args=(ids, mask), **common)
                a_txt, delta_txt = lig.attribute(ids, baselines=base_ids, additional_forward_args=(pv, mask), **common)
                images.append(a_img.detach().double().cpu())
                tokens.append(a_txt.detach().double().cpu())
                d_img.append(delta_img.detach().double().cpu())
                d_txt.append(delta_txt.detach().double().cpu())
        return MultimodalAttribution(
            self.name,
            self.target.name,
            torch.stack(images, -1),
            torch.stack(tokens, -1),
            mask.cpu(),
            cls.cpu(),
            output.gather(1, cls).double().cpu(),
            {"image": ref_image.gather(1, cls).double().cpu(), "text": ref_text.gather(1, cls).double().cpu()},
            {"image": torch.stack(d_img, -1), "text": torch.stack(d_txt, -1)},
        )
