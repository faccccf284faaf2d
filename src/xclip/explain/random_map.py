"""The random baseline every explanation is measured against: `random_values` (the one source of
random maps and attributions in xclip: seeded, device-independent) and `RandomMap`, an explainer
with the others' calling convention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xclip.explain.base import Explainer, Texts, as_text_list
from xclip.explain.targets import Target


def random_values(
    shape: Sequence[int], source: int | torch.Generator = 0, normal: bool = False, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uniform ``[0, 1)`` (or standard normal) values of `shape` on the CPU, drawn from a generator
    seeded with `source` (an int), or from `source` itself (a ``torch.Generator`` whose sequence
    continues). The same seed gives the same values on every device and in every process."""
    generator = source if isinstance(source, torch.Generator) else torch.Generator().manual_seed(int(source))
    draw = torch.randn if normal else torch.rand
    return draw(tuple(int(s) for s in shape), generator=generator, dtype=dtype)


class RandomMap(Explainer):
    """Uniform [0, 1) maps ``[N, K, gh, gw]`` (`random_values`); each call draws new maps, and the
    same seed replays the same sequence."""

    name = "random"

    def __init__(self, backbone, seed: int = 0, precision: str | int | None = None):
        super().__init__(backbone, precision)
        self.generator = torch.Generator().manual_seed(seed)

    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        k = 1 if pairs else texts.shape[0] if isinstance(texts, Tensor) else len(as_text_list(texts))
        gh, gw = self.backbone.patch_grid(images)
        return random_values((images.shape[0], k, gh, gw), self.generator).to(images.device)
