"""Scalar targets an explainer differentiates: callables ``(image_emb [N,D], text_emb [K,D]) -> [N,K]``.

Image n's row may depend on any text (e.g. a softmax over K class prompts) but only on image n:
that is what lets the explainers handle a whole batch with batched gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

Target = Callable[[Tensor, Tensor], Tensor]


def cosine(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Plain cosine similarity of the embeddings (the model's own score, no logit scale): [N, K]."""
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


class ClassSoftmax:
    """Probability of each of the K prompts under a softmax over all K (zero-shot classification).

    Args:
        logit_scale: the temperature-inverse applied to the cosines (CLIP's is 100).
    """

    def __init__(self, logit_scale: float = 100.0):
        self.logit_scale = logit_scale

    def __call__(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        return (self.logit_scale * cosine(image_emb, text_emb)).softmax(dim=-1)


TARGETS: dict[str, Target] = {"cosine": cosine, "softmax": ClassSoftmax()}


def resolve_target(target: str | Target) -> Target:
    """A target by name (``cosine``, ``softmax``) or any callable of (image_emb, text_emb)."""
    if callable(target):
        return target
    if target not in TARGETS:
        raise ValueError(
            f"unknown target {target!r}: use one of {sorted(TARGETS)} or a callable "
            "(image_emb [N,D], text_emb [K,D]) -> [N,K]"
        )
    return TARGETS[target]
