"""Concepts and phrases for SEARLE's regulariser on ShapesWorld.

SEARLE regularises the pseudo token with *concepts* (the Open Images class names CLIP finds most
similar to an image: top 15 for OTI, 150 for phi) and *phrases* (256 GPT-Neo sentences per
concept): the text of a phrase with the concept replaced by ``$`` should match the text of the
phrase itself. ShapesWorld knows its scenes, so here the concepts of an image are its objects'
classes, and a concept's phrases are ShapesWorld captions (full captions in both paraphrase
variants, or short captions) of random scenes that name the concept exactly once.

Two granularities (``kind``): ``"shape"`` (default; ``"circle"``, the analogue of an Open Images
class name: the pseudo token learns to stand where a noun stands, behind its colour and size
words) or ``"object"`` (``"red circle"``: colour + shape, the caption generator's noun).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xclip.backbones import Backbone
from xclip.cir.query import encode_plain
from xclip.data.shapes.scene import (
    COLOURS,
    SHAPES,
    Scene,
    caption,
    sample_scene,
    short_caption,
)

CONCEPT_KINDS = ("shape", "object")
PSEUDO_WORD = " $ "  # SEARLE pads the placeholder with spaces when it replaces a concept


def all_concepts(kind: str = "shape") -> tuple[str, ...]:
    """Every ShapesWorld concept of a granularity: the six shapes, or the 36 colour + shape nouns."""
    if kind not in CONCEPT_KINDS:
        raise ValueError(f"concept kind must be one of {CONCEPT_KINDS}, got {kind!r}")
    return SHAPES if kind == "shape" else tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def _concept_of(obj, kind: str) -> str:
    return obj.shape if kind == "shape" else obj.noun


def scene_concepts(scene: Scene, kind: str = "shape") -> list[str]:
    """The concepts of a scene: its objects' shapes (or colour + shape nouns), each once, in drawing order."""
    all_concepts(kind)
    return list(dict.fromkeys(_concept_of(o, kind) for o in scene.objects))


def replace_concept(phrase: str, concept: str, every: bool) -> str:
    """`phrase` with the concept replaced by ``$``: the first occurrence (OTI) or every one (phi
    training). A phrase without the concept is an error (SEARLE filters such concepts out)."""
    if concept not in phrase:
        raise ValueError(f"phrase {phrase!r} does not contain the concept {concept!r}")
    return phrase.replace(concept, PSEUDO_WORD, -1 if every else 1)


def concept_phrases(concept: str, n: int, seed: int = 0, kind: str = "shape") -> list[str]:
    """`n` distinct captions of random scenes that name `concept` exactly once, as a whole word
    (the stand-in for SEARLE's GPT phrases). Deterministic in (concept, n, seed, kind)."""
    concepts = all_concepts(kind)
    if concept not in concepts:
        raise ValueError(f"unknown ShapesWorld {kind} concept {concept!r}; concepts are {concepts[:8]}...")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shape = concept.split(" ")[-1]
    colours = (concept.split(" ")[0],) if kind == "object" else tuple(COLOURS)
    rng = np.random.default_rng([int(seed), CONCEPT_KINDS.index(kind), concepts.index(concept)])
    word = re.compile(rf"\b{concept}\b")
    out: dict[str, None] = {}
    for _ in range(50 * n):
        scene = sample_scene(rng, max_objects=3).with_object(0, shape=shape, colour=colours[rng.integers(len(colours))])
        if sum(_concept_of(o, kind) == concept for o in scene.objects) != 1:
            continue
        style = int(rng.integers(4))  # a full caption (either paraphrase), or a short one with colours
        text = caption(scene, int(rng.integers(2))) if style < 2 else short_caption(scene, 0 if style == 2 else 2)
        if len(word.findall(text)) == 1:
            out[text] = None
        if len(out) == n:
            return list(out)
    raise RuntimeError(f"could only draw {len(out)} distinct phrases for {concept!r}; ask for fewer than {n}")


@dataclass
class PhraseBank:
    """Phrases per concept with their text features, computed once.

    ``phrases`` [P] (concept-major), ``concept_of`` [P] long (index into ``concepts``),
    ``features`` [P, D] (unnormalised text features of the phrases, no graph), ``start`` /
    ``count`` [C]: each concept's slice of ``phrases``.
    """

    concepts: list[str]
    phrases: list[str]
    concept_of: Tensor
    features: Tensor
    start: Tensor
    count: Tensor

    @classmethod
    def build(
        cls,
        backbone: Backbone,
        kind: str = "shape",
        per_concept: int = 256,
        seed: int = 0,
        concepts: Sequence[str] | None = None,
        batch_size: int = 512,
    ) -> PhraseBank:
        """Draw `per_concept` phrases for every concept (default: all of `kind`) and embed them."""
        concepts = list(concepts if concepts is not None else all_concepts(kind))
        phrases, owner = [], []
        for c, concept in enumerate(concepts):
            drawn = concept_phrases(concept, per_concept, seed, kind)
            phrases.extend(drawn)
            owner.extend([c] * len(drawn))
        with torch.no_grad():
            feats = torch.cat(
                [
                    encode_plain(backbone, phrases[i : i + batch_size]).float()
                    for i in range(0, len(phrases), batch_size)
                ]
            )
        count = torch.tensor([owner.count(c) for c in range(len(concepts))])
        start = torch.cumsum(count, 0) - count
        return cls(concepts, phrases, torch.tensor(owner), feats, start, count)

    def index_of(self, concept: str) -> int:
        try:
            return self.concepts.index(concept)
        except ValueError:
            raise KeyError(f"concept {concept!r} is not in the phrase bank ({len(self.concepts)} concepts)") from None
