"""Deterministic ShapesWorld samples: one seed + one index -> the same bytes, in any order.

Every sample draws from its own ``numpy`` generator seeded with ``(seed, stream, index)``, so a
dataset can be read in any order, by any number of workers, and always yields the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from xclip.data.shapes.render import render
from xclip.data.shapes.scene import (
    COLOURS,
    SHAPES,
    Scene,
    caption,
    place_like,
    sample_scene,
    short_caption,
)

# One stream id per dataset kind so that, e.g., the CIR and retrieval sets of one seed differ.
STREAMS = {
    "captions": 1,
    "classification": 2,
    "spurious": 3,
    "cir": 4,
    "faithfulness": 5,
    "multimodal": 6,
    "pretrain": 7,
    "notes": 8,
    "circo": 9,
}


SPLITS = ("train", "val", "test")
# Test samples are keyed [seed, stream, index, TEST_KEY]; training and validation samples
# [seed, stream, index] (kept apart by their seeds: held-out sets use seed + 1000). A key of
# another length seeds another generator, so no test sample equals any training or validation
# sample, whatever the seeds.
TEST_KEY = 0x7E57


def sample_key(seed: int, stream: str, index: int, split: str = "val") -> list[int]:
    """The seed words of sample `index` of `stream` under `seed` (``split="test"``: the disjoint
    test family, see `TEST_KEY`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [int(seed), STREAMS[stream], int(index)] + ([TEST_KEY] if split == "test" else [])


def sample_rng(seed: int, stream: str, index: int, split: str = "val") -> np.random.Generator:
    """The generator of sample `index` of `stream` under `seed` (see `sample_key`)."""
    return np.random.default_rng(sample_key(seed, stream, index, split))


def part_rng(seed: int, stream: str, index: int, part: int, split: str = "val") -> np.random.Generator:
    """A generator for part `part` (>= 0) of sample `index`, e.g. one image of a set that shares a
    scene graph. numpy pads seed words with zeros, so part p is keyed ``p + 1``: never the
    sample's own generator."""
    if part < 0:
        raise ValueError(f"part must be >= 0, got {part}")
    return np.random.default_rng(sample_key(seed, stream, index, split) + [int(part) + 1])


@dataclass
class ShapesSample:
    """A rendered scene: ``image`` uint8 [S, S, 3], ``instances`` int8 [S, S] (0 = background,
    i + 1 = object i), the scene graph and its captions."""

    image: np.ndarray
    instances: np.ndarray
    scene: Scene
    captions: list[str] = field(default_factory=list)

    def object_masks(self) -> np.ndarray:
        """Visible pixels of each object, bool [n_objects, S, S]."""
        ids = np.arange(1, len(self.scene.objects) + 1, dtype=np.int8)
        return self.instances[None] == ids[:, None, None]

    def tensor(self) -> torch.Tensor:
        """The image as float [3, S, S] in [0, 1]."""
        return image_tensor(self.image)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> float [..., 3, S, S] in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    return t.movedim(-1, -3).float().div_(255.0)


def draw(scene: Scene, size: int, rng: np.random.Generator, n_captions: int = 2) -> ShapesSample:
    """Render `scene` and attach its `n_captions` full captions (variants 0, 1, ...)."""
    image, instances = render(scene, size, rng)
    return ShapesSample(image, instances, scene, [caption(scene, v) for v in range(n_captions)])


def generate(seed: int, index: int, size: int = 64, max_objects: int = 3, n_captions: int = 2) -> ShapesSample:
    """ShapesWorld sample `index` of `seed`: 1..`max_objects` objects, full captions."""
    rng = sample_rng(seed, "captions", index)
    return draw(sample_scene(rng, max_objects=max_objects), size, rng, n_captions)


def counterfactual(scene: Scene, rng: np.random.Generator) -> Scene:
    """A hard negative of `scene`: one object gets another shape (most often) or colour.

    Pairs that differ in one attribute force a contrastive model to look at that attribute;
    colour alone separates most random pairs, so shape changes dominate.
    """
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    if rng.random() < 0.7:
        others = [s for s in SHAPES if s != obj.shape]
        return scene.with_object(i, shape=others[rng.integers(len(others))])
    others = [c for c in COLOURS if c != obj.colour]
    return scene.with_object(i, colour=others[rng.integers(len(others))])


def training_caption(scene: Scene, style: int, variant: int, prefix: bool) -> str:
    """A pretraining caption: the full caption (`style` -1, paraphrase `variant`) or a short one
    of `SHORT_STYLES[style]` that still names every shape; optionally behind 'a photo of'."""
    text = caption(scene, variant) if style < 0 else short_caption(scene, style)
    return f"a photo of {text}." if prefix else text


def relocated(scene: Scene, index: int, rng: np.random.Generator) -> Scene | None:
    """`scene` with object `index` moved to a free spot, or None when nothing fits."""
    rest = [o for j, o in enumerate(scene.objects) if j != index]
    moved = place_like(rng, rest, scene.objects[index])
    if moved is None:
        return None
    objects = list(scene.objects)
    objects[index] = moved
    return Scene(scene.background, tuple(objects))
