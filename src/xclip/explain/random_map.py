"""A random-map baseline with the explainers' calling convention (the floor every method must beat)."""

from __future__ import annotations

import torch
from torch import Tensor

from xclip.explain.base import Explainer, Texts, as_text_list
from xclip.explain.targets import Target


class RandomMap(Explainer):
    """Uniform [0, 1) maps ``[N, K, gh, gw]`` from a seeded, device-independent generator; each
    call draws new maps, and the same seed replays the same sequence."""

    name = "random"

    def __init__(self, backbone, seed: int = 0, precision: str | int | None = None):
        super().__init__(backbone, precision)
        self.generator = torch.Generator().manual_seed(seed)

    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        k = 1 if pairs else texts.shape[0] if isinstance(texts, Tensor) else len(as_text_list(texts))
        gh, gw = self.backbone.patch_grid(images)
        return torch.rand(images.shape[0], k, gh, gw, generator=self.generator).to(images.device)
