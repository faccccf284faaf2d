"""Measuring attributions where the truth is known (ShapesWorld notes): the share of the image
attribution mass on the deciding object (the ``shape`` task), the rank of the deciding word among
the note's words (the ``background`` task), and each task's modality share.

Plain functions over `MultimodalAttribution`s; ``scripts/eval_distill_attributions.py`` runs them
for trained and untrained models next to a random attribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xclip.explain.multimodal import MultimodalAttribution, merge_subwords, word_rank
from xclip.explain.random_map import random_values


def mass_on_region(maps: Tensor, masks: Tensor) -> Tensor:
    """Per sample, the share of a non-negative map's mass inside its region: [N, H, W] maps and
    [N, H, W] bool masks -> [N] (NaN for an all-zero map)."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ")
    if (maps < 0).any():
        raise ValueError("mass_on_region needs non-negative maps (e.g. |attribution| summed over channels)")
    total = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / total, torch.full_like(total, float("nan")))


def deciding_word_ranks(
    tokens: Sequence[Sequence[str]], scores: Tensor, attention_mask: Tensor, words: Sequence[str]
) -> tuple[list[int | None], list[int]]:
    """(rank of ``words[i]`` among sample i's merged words by |score|, 1 = top; the number of
    words of each sample)."""
    ranks, counts = [], []
    for i, word in enumerate(words):
        n = int(attention_mask[i].sum())
        merged = merge_subwords(list(tokens[i][:n]), scores[i, :n].tolist())
        ranks.append(word_rank(merged, word))
        counts.append(len(merged))
    return ranks, counts


def random_attribution_like(attribution: MultimodalAttribution, seed: int) -> MultimodalAttribution:
    """The random baseline: i.i.d. N(0, 1) values of the same shapes (masked tokens stay 0)."""
    g = torch.Generator().manual_seed(seed)
    image = random_values(attribution.image.shape, g, normal=True, dtype=torch.float64)
    tokens = random_values(attribution.tokens.shape, g, normal=True, dtype=torch.float64)
    tokens = tokens * attribution.attention_mask[:, :, None, None].to(tokens.dtype)
    return MultimodalAttribution(
        "random",
        attribution.target,
        image,
        tokens,
        attribution.attention_mask,
        attribution.classes,
        attribution.output,
        attribution.references,
        attribution.deltas,
    )
