"""Class embeddings from prompt templates (CLIP's prompt ensembling): the zero-shot classifier of
`xclip.clip` and the ID class embeddings of NegLabel (`xclip.ood`) both use it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def prompt_texts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: [C * M] strings."""
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt templates must contain '{{}}' for the class name; got {bad}")
    return [t.format(c) for c in classnames for t in templates]


@torch.no_grad()
def zero_shot_weights(
    encode_texts: Callable[[list[str]], Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """Class weights [C, D]: the normalised mean of the normalised embeddings of each class's
    prompts. `encode_texts` maps a list of strings to [n, D] embeddings."""
    emb = F.normalize(encode_texts(prompt_texts(classnames, templates)).float(), dim=-1)
    emb = emb.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)
