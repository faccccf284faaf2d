"""SEARLE-OTI: optimisation-based textual inversion, batched over many images.

For every image a pseudo token v (init N(0, 0.02)) is optimised with AdamW (lr 2e-2, weight
decay 0.01) for 350 steps, keeping an EMA of v (decay 0.99; the EMA is the result). Each step,
per image:

    L_cos = 1 - cos(text(random template with $, v), image feature)
    L_reg = 1 - cos(text(one of its concepts' phrases with the FIRST occurrence of the concept
                         replaced by $, v), text(the phrase))
    L     = (1 * L_cos + 0.5 * L_reg) / 1.5

Batched: all images of a chunk are optimised together and the per-image losses are *summed*, so
each token receives exactly the gradient it would receive alone, and AdamW's update is elementwise:
the batched result equals running the images one at a time (tested). The random choices
(templates, concepts, phrases, the initial token) come from a generator keyed by (seed, image key),
so they do not depend on the batch either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone
from xclip.cir.concepts import PhraseBank, replace_concept
from xclip.cir.phi import token_width
from xclip.cir.query import encode_with_pseudo_tokens
from xclip.explain.base import autocast, explaining

# PALAVRA's templates, as SEARLE uses them for L_cos ("{}" becomes " $ ")
TEMPLATES: tuple[str, ...] = (
    "This is a photo of a {}",
    "This photo contains a {}",
    "A photo of a {}",
    "This is an illustration of a {}",
    "This illustration contains a {}",
    "An illustrations of a {}",
    "This is a sketch of a {}",
    "This sketch contains a {}",
    "A sketch of a {}",
    "This is a diagram of a {}",
    "This diagram contains a {}",
    "A diagram of a {}",
    "A {}",
    "We see a {}",
    "{}",
    "We see a {} in this photo",
    "We see a {} in this image",
    "We see a {} in this illustration",
    "We see a {} photo",
    "We see a {} image",
    "We see a {} illustration",
    "{} photo",
    "{} image",
    "{} illustration",
)


@dataclass
class OTIConfig:
    """SEARLE-OTI's hyper-parameters (defaults = the paper's)."""

    steps: int = 350
    lr: float = 2e-2
    weight_decay: float = 0.01
    ema_decay: float = 0.99
    lambda_cos: float = 1.0
    lambda_reg: float = 0.5
    init_std: float = 0.02
    seed: int = 0
    templates: tuple[str, ...] = field(default=TEMPLATES)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _choices(
    config: OTIConfig, key: int, n_concepts: Sequence[int], bank_counts: Sequence[int], width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Tensor]:
    """One image's random draws for every step: template ids [S], concept slot [S], phrase
    offset within that concept [S], and the initial token [W]."""
    rng = np.random.default_rng([int(config.seed), int(key) & 0xFFFFFFFF, int(key) >> 32])
    # the initial token first: it must not depend on the number of steps
    init = torch.randn(width, generator=torch.Generator().manual_seed(int(rng.integers(2**62)))) * config.init_std
    steps = config.steps
    template = rng.integers(len(config.templates), size=steps)
    slot = rng.integers(max(len(n_concepts), 1), size=steps)
    phrase = (
        rng.random(steps) * np.asarray(bank_counts, dtype=np.float64)[slot] if len(bank_counts) else np.zeros(steps)
    ).astype(np.int64)
    return template, slot, phrase, init


def oti_invert(
    backbone: Backbone,
    image_features: Tensor,
    keys: Sequence[int],
    concepts: Sequence[Sequence[str]] | None = None,
    bank: PhraseBank | None = None,
    config: OTIConfig | None = None,
    precision: str | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> Tensor:
    """Pseudo tokens of N images by OTI, all optimised together.

    Args:
        backbone: the frozen CLIP (never modified; eval mode while inverting).
        image_features: [N, D] *unnormalised* image features (``encode_image`` output).
        keys: N integers naming the images (dataset indices): they seed each image's random draws.
        concepts: N lists of concept names (needs `bank`); None turns the regulariser off.
        bank: phrases and their features for every concept named in `concepts`.
        config: hyper-parameters (default: SEARLE's).
        precision: autocast precision (``"bf16-mixed"``, ...; None = fp32).
        on_step: called with (step, mean L_cos, mean L_reg) after every step.
    Returns:
        The EMA pseudo tokens [N, W] (float32, no graph).
    """
    config = config or OTIConfig()
    n = image_features.shape[0]
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} image features")
    if n == 0:
        return image_features.new_zeros(0, token_width(backbone))
    reg_bank: PhraseBank | None = None  # L_reg's phrases; None: no regulariser
    concept_ids: list[list[int]] = [[] for _ in range(n)]  # each image's concepts as indices into the bank
    if concepts is not None and config.lambda_reg > 0:
        if bank is None:
            raise ValueError("oti_invert: concepts need a PhraseBank (bank=...)")
        if len(concepts) != n:
            raise ValueError(f"{len(concepts)} concept lists for {n} images")
        empty = [i for i, c in enumerate(concepts) if not c]
        if empty:
            raise ValueError(
                f"images {empty[:10]} have no concept: give every image at least one, or pass concepts=None"
            )
        reg_bank, concept_ids = bank, [[bank.index_of(c) for c in cs] for cs in concepts]
    width = token_width(backbone)
    device = backbone.device
    counts = [[int(reg_bank.count[c]) for c in ids] if reg_bank is not None else [] for ids in concept_ids]
    draws = [_choices(config, k, concept_ids[i], counts[i], width) for i, k in enumerate(keys)]
    templates = np.stack([d[0] for d in draws])  # [N, S]
    token = torch.nn.Parameter(torch.stack([d[3] for d in draws]).to(device))
    ema = token.detach().clone()
    optimizer = torch.optim.AdamW([token], lr=config.lr, weight_decay=config.weight_decay)
    target = image_features.detach().float().to(device)
    total_w = config.lambda_cos + (config.lambda_reg if reg_bank is not None else 0.0)
    rows = np.arange(n)
    with explaining(backbone.model):
        for step in range(config.steps):
            prompts = [config.templates[t].format(" $ ") for t in templates[:, step]]
            with autocast(device, precision):
                feats = encode_with_pseudo_tokens(backbone, prompts, token)
                loss_cos = 1 - F.cosine_similarity(feats.float(), target, dim=-1)  # [N]
                loss = config.lambda_cos * loss_cos
                if reg_bank is not None:
                    chosen = [concept_ids[i][draws[i][1][step] % len(concept_ids[i])] for i in rows]
                    phrase_idx = [int(reg_bank.start[c]) + int(draws[i][2][step]) for i, c in zip(rows, chosen)]
                    pseudo = [
                        replace_concept(reg_bank.phrases[p], reg_bank.concepts[c], every=False)
                        for p, c in zip(phrase_idx, chosen)
                    ]
                    reg_feats = encode_with_pseudo_tokens(backbone, pseudo, token)
                    real = reg_bank.features[phrase_idx].to(device)
                    loss_reg = 1 - F.cosine_similarity(reg_feats.float(), real, dim=-1)
                    loss = loss + config.lambda_reg * loss_reg
            optimizer.zero_grad(set_to_none=True)
            (loss / total_w).sum().backward()  # a sum: each token gets its own image's gradient only
            optimizer.step()
            with torch.no_grad():
                ema.mul_(config.ema_decay).add_(token.detach(), alpha=1 - config.ema_decay)
            if on_step is not None:
                mean_reg = float(loss_reg.detach().mean()) if reg_bank is not None else 0.0
                on_step(step, float(loss_cos.detach().mean()), mean_reg)
    return ema.float()
