"""ShapesWorld scene graphs: the vocabulary, random scenes and their captions.

A scene is a background plus 1-3 objects (shape, colour, size, centre). Positions are fractions
of the image side so one scene renders at any resolution. Captions are derived from the scene
graph only, so every word in a caption is checkable against the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (30, 160, 50),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (145, 50, 200),
    "orange": (245, 125, 20),
}
SIZES: dict[str, float] = {"small": 0.13, "large": 0.21}  # radius as a fraction of the image side
# How far each shape reaches from its centre, in radii (square corners, triangle tips poke out).
EXTENTS: dict[str, float] = {"circle": 1.0, "square": 1.17, "triangle": 1.16, "star": 1.0, "cross": 1.05, "heart": 1.1}
BACKGROUNDS: tuple[str, ...] = ("plain", "water", "land", "sky", "sand")
BACKGROUND_PHRASES: dict[str, str] = {
    "plain": "on a plain background",
    "water": "on water",
    "land": "on land",
    "sky": "in the sky",
    "sand": "on sand",
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("to the left of", "to the right of", "above", "below")


@dataclass(frozen=True)
class ShapeObject:
    """One object: its attributes and centre (fractions of the image side, y grows downwards)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def extent(self) -> float:
        """Distance from the centre to the farthest pixel, as a fraction of the image side."""
        if self.shape not in EXTENTS:
            raise ValueError(f"unknown shape {self.shape!r}; ShapesWorld shapes are {SHAPES}")
        return EXTENTS[self.shape] * self.radius

    @property
    def noun(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A ShapesWorld scene graph: a background and its objects (drawn in order)."""

    background: str
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    def with_object(self, index: int, **changes) -> Scene:
        """A copy with object `index` changed (e.g. ``colour="blue"``)."""
        objects = list(self.objects)
        objects[index] = replace(objects[index], **changes)
        return replace(self, objects=tuple(objects))

    def relations(self) -> list[tuple[int, str, int]]:
        """Pairwise spatial relations ``(i, relation, j)`` read off the object centres."""
        out = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i != j:
                    out.append((i, relation(a, b), j))
        return out

    def to_dict(self) -> dict:
        """The scene graph as plain JSON-able data."""
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "cx": o.cx, "cy": o.cy} for o in self.objects
            ],
            "relations": [[i, r, j] for i, r, j in self.relations()],
        }


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is relative to `b`: the dominant axis of the centre offset decides."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def position_phrase(obj: ShapeObject) -> str:
    """Where the object sits in a 3x3 layout: 'in the top left', 'on the left', 'in the center'."""
    col = "left" if obj.cx < 0.4 else "right" if obj.cx > 0.6 else ""
    row = "top" if obj.cy < 0.4 else "bottom" if obj.cy > 0.6 else ""
    if row and col:
        return f"in the {row} {col}"
    if row or col:
        return f"{'at' if row else 'on'} the {row or col}"
    return "in the center"


def _fits(objects: list[ShapeObject], cand: ShapeObject, margin: float) -> bool:
    return all(np.hypot(o.cx - cand.cx, o.cy - cand.cy) >= o.extent + cand.extent + margin for o in objects)


def sample_object(
    rng: np.random.Generator,
    placed: list[ShapeObject],
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
    sizes: tuple[str, ...] = tuple(SIZES),
    margin: float = 0.02,
    tries: int = 30,
) -> ShapeObject | None:
    """A random object that does not overlap `placed`, or None after `tries` attempts."""
    shape = shapes[rng.integers(len(shapes))]
    colour = colours[rng.integers(len(colours))]
    size = sizes[rng.integers(len(sizes))]
    r = SIZES[size]
    for _ in range(tries):
        cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        cand = ShapeObject(shape, colour, size, float(cx), float(cy))
        if _fits(placed, cand, margin):
            return cand
    return None


def place_like(
    rng: np.random.Generator, placed: list[ShapeObject], template: ShapeObject, tries: int = 30
) -> ShapeObject | None:
    """`template` moved to a random free position (same attributes), or None."""
    r = template.radius
    for _ in range(tries):
        cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        cand = replace(template, cx=float(cx), cy=float(cy))
        if _fits(placed, cand, 0.02):
            return cand
    return None


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    max_objects: int = 3,
    backgrounds: tuple[str, ...] = BACKGROUNDS,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
) -> Scene:
    """A random scene with `n_objects` objects (1..`max_objects` uniformly when None)."""
    n = int(n_objects) if n_objects is not None else int(rng.integers(1, max_objects + 1))
    background = backgrounds[rng.integers(len(backgrounds))]
    objects: list[ShapeObject] = []
    while len(objects) < n:
        obj = sample_object(rng, objects, shapes=shapes, colours=colours)
        if obj is None:  # crowded: start over, same rng stream, so still deterministic
            objects = []
            continue
        objects.append(obj)
    return Scene(background, tuple(objects))


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "sh", "ch", "x")) else "s")


def _groups(scene: Scene) -> list[list[int]]:
    """Object indices grouped by (colour, shape), groups ordered by first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        groups.setdefault((o.colour, o.shape), []).append(i)
    return list(groups.values())


def _group_phrase(scene: Scene, idx: list[int], with_size: bool = True) -> str:
    objs = [scene.objects[i] for i in idx]
    sizes = {o.size for o in objs}
    size = f"{objs[0].size} " if with_size and len(sizes) == 1 else ""
    noun = objs[0].shape if len(objs) == 1 else _plural(objs[0].shape)
    return article(f"{COUNT_WORDS[len(objs)]} {size}{objs[0].colour} {noun}")


def article(phrase: str) -> str:
    """'a orange circle' -> 'an orange circle'."""
    return "an " + phrase[2:] if phrase.startswith("a ") and phrase[2:3] in "aeiou" else phrase


def _group_centre(scene: Scene, idx: list[int]) -> ShapeObject:
    objs = [scene.objects[i] for i in idx]
    return replace(objs[0], cx=float(np.mean([o.cx for o in objs])), cy=float(np.mean([o.cy for o in objs])))


def caption(scene: Scene, variant: int = 0) -> str:
    """A full caption of `scene`: every object's count, size, colour and shape, the spatial
    layout and the background. `variant` 1 is a paraphrase (groups reversed, inverse relation).
    """
    bg = BACKGROUND_PHRASES[scene.background]
    groups = _groups(scene)
    if not groups:
        return f"an empty scene {bg}"
    if variant % 2 == 1:
        groups = groups[::-1]
    if len(groups) == 1:
        g = groups[0]
        phrase = _group_phrase(scene, g)
        if len(g) == 1:
            where = position_phrase(scene.objects[g[0]])
            return f"{phrase} {where} {bg}" if variant % 2 == 0 else f"{phrase} {bg}, {where}"
        return f"{phrase} {bg}" if variant % 2 == 0 else f"there are {phrase} {bg}"
    if len(groups) == 2:
        a, b = (_group_centre(scene, g) for g in groups)
        rel = relation(a, b)
        return f"{_group_phrase(scene, groups[0])} {rel} {_group_phrase(scene, groups[1])} {bg}"
    ordered = sorted(groups, key=lambda g: _group_centre(scene, g).cx)
    if variant % 2 == 1:
        ordered = ordered[::-1]
    names = [_group_phrase(scene, g) for g in ordered]
    direction = "from left to right" if variant % 2 == 0 else "from right to left"
    return f"{', '.join(names[:-1])} and {names[-1]}, {direction}, {bg}"


SHORT_STYLES = ("colour_shape", "shape", "colour_shape_background")


def short_caption(scene: Scene, style: int) -> str:
    """A shorter training caption that always names every shape: 'a red circle and a star'.

    `style` indexes `SHORT_STYLES`: colour + shape, shape only, colour + shape + background.
    """
    groups = _groups(scene)
    parts = []
    for g in groups:
        o = scene.objects[g[0]]
        noun = o.shape if len(g) == 1 else _plural(o.shape)
        parts.append(
            article(f"{COUNT_WORDS[len(g)]} {noun}" if style == 1 else f"{COUNT_WORDS[len(g)]} {o.colour} {noun}")
        )
    text = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    if style == 2:
        text = f"{text} {BACKGROUND_PHRASES[scene.background]}"
    return text
