"""Automatic failure labels on ShapesWorld, read off the scene graphs.

A ShapesWorld caption is generated from its image's scene graph, so a failure (caption of image A
retrieved image B) can be labelled by comparing the two graphs:

1. the caption is also a caption of B (for some object order and paraphrase variant): Ambiguous,
   ``nearduplicate`` when A and B agree on background and on every object's shape, colour, size
   and 3x3 position cell, else ``underspecified`` (they differ where the caption is silent);
2. otherwise the first difference in this order: the set of shapes (Object), the number of
   objects of each shape (Count), their colours or sizes (Attribute), the background (Context),
   and else the layout (Spatial). ShapesWorld has no actions, so Action never occurs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence

from xclip.data.shapes.scene import Scene, caption, position_phrase
from xclip.retrieval.failures.extract import Failure
from xclip.retrieval.failures.taxonomy import ATTRIBUTE, CONTEXT, COUNT, NEARDUPLICATE, OBJECT, SPATIAL, UNDERSPECIFIED

_VARIANTS = (0, 1)  # caption() has two paraphrases (variant % 2)


def captions_true_of(scene: Scene) -> set[str]:
    """Every caption ShapesWorld can write for `scene`: each paraphrase for each object order
    (the generator words groups in drawing order, which the image does not show)."""
    return {
        caption(Scene(scene.background, order), v) for order in itertools.permutations(scene.objects) for v in _VARIANTS
    }


def _signature(scene: Scene) -> tuple:
    """What a viewer can tell apart: background and each object's attributes and 3x3 position cell."""
    return scene.background, sorted((o.shape, o.colour, o.size, position_phrase(o)) for o in scene.objects)


def autolabel(caption_text: str, gt_scene: Scene, retrieved_scene: Scene) -> str:
    """The canonical taxonomy label of the failure of `caption_text` (a caption of `gt_scene`)
    that retrieved the image of `retrieved_scene`."""
    if caption_text in captions_true_of(retrieved_scene):
        return NEARDUPLICATE if _signature(gt_scene) == _signature(retrieved_scene) else UNDERSPECIFIED
    shapes_gt = Counter(o.shape for o in gt_scene.objects)
    shapes_ret = Counter(o.shape for o in retrieved_scene.objects)
    if set(shapes_gt) != set(shapes_ret):
        return OBJECT
    if shapes_gt != shapes_ret:
        return COUNT
    if Counter((o.shape, o.colour, o.size) for o in gt_scene.objects) != Counter(
        (o.shape, o.colour, o.size) for o in retrieved_scene.objects
    ):
        return ATTRIBUTE
    if gt_scene.background != retrieved_scene.background:
        return CONTEXT
    return SPATIAL


def autolabel_failures(failures: Sequence[Failure], scene_of: Callable[[int], Scene]) -> list[str]:
    """`autolabel` for every failure; `scene_of(i)` is the scene graph of gallery image i."""
    return [autolabel(f.caption, scene_of(f.gt_image), scene_of(f.retrieved_image)) for f in failures]
