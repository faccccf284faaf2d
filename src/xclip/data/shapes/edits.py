"""Single-attribute edits of ShapesWorld scenes and the relative captions that name them.

A composed-image-retrieval query is a reference scene plus a caption that names one change
("has a blue circle instead of a red one"); its target is the reference with exactly that change.
Edits change one attribute of one object (colour, shape, size, count, position) or the background,
and nothing else, so every variant of a reference differs from it in exactly the named attribute.
The same edits make the relative captions of the tiny CLIP's pretraining pairs (its twins differ in
one attribute), so the text tower reads "instead of", "not", "but" and "also" before it meets a
CIR query.

What a caption asserts is checkable on scene graphs: `describe` is the scene as words can tell it
(background and each object's shape, colour, size and 3 x 3 position), and a single-edit caption is
satisfied by exactly the scenes whose description equals the edited reference's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from xclip.data.shapes.scene import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    _fits,
    _plural,
    article,
    position_phrase,
)

EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "size", "count", "position", "background")
# Caption phrasings per edit: 0 = "... instead of ..." (the benchmark's), 1 = "..., not ..." / "also ...".
PHRASINGS = 2


@dataclass(frozen=True)
class Edit:
    """One single-attribute edit of a reference scene.

    ``index`` is the edited object of the reference (-1 for a background edit); ``old`` / ``new``
    the attribute's values (for ``count``: ``"1"`` -> ``"2"``, a copy of the object is added; for
    ``position``: the 3 x 3 position phrases); ``obj`` the edited object as the reference shows it.
    """

    kind: str
    index: int
    old: str
    new: str
    obj: ShapeObject | None = None

    def edited_object(self) -> ShapeObject:
        """`obj`, which every edit but a background one carries."""
        if self.obj is None:
            raise ValueError(f"a {self.kind!r} edit needs the edited object (obj), got None")
        return self.obj


def describe(scene: Scene) -> tuple[str, tuple[tuple[str, str, str, str], ...]]:
    """What words can say about a scene: its background and the sorted (shape, colour, size,
    position phrase) of every object. Two scenes with one description satisfy the same captions."""
    return scene.background, tuple(sorted((o.shape, o.colour, o.size, position_phrase(o)) for o in scene.objects))


def _other(rng: np.random.Generator, options, current):
    rest = [o for o in options if o != current]
    return rest[int(rng.integers(len(rest)))]


def _free_spot(
    rng: np.random.Generator,
    placed: list[ShapeObject],
    template: ShapeObject,
    avoid_phrase: str | None,
    tries: int = 60,
) -> ShapeObject | None:
    """`template` at a random spot clear of `placed` (and, with `avoid_phrase`, in another 3 x 3 cell)."""
    r = template.radius
    for _ in range(tries):
        cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        cand = replace(template, cx=float(cx), cy=float(cy))
        if _fits(placed, cand, 0.02) and (avoid_phrase is None or position_phrase(cand) != avoid_phrase):
            return cand
    return None


def apply_edit(scene: Scene, kind: str, index: int, rng: np.random.Generator) -> tuple[Scene, Edit] | None:
    """`scene` with one attribute of object `index` (or the background) changed: ``(edited, edit)``,
    or None when the scene leaves no room (a larger object would overlap, no free spot for a copy
    or a move). Random choices (the new value, a new position) come from `rng`."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; choose from {EDIT_KINDS}")
    if kind == "background":
        new = _other(rng, BACKGROUNDS, scene.background)
        return replace(scene, background=new), Edit(kind, -1, scene.background, new)
    obj = scene.objects[index]
    rest = [o for j, o in enumerate(scene.objects) if j != index]
    if kind == "colour":
        new = _other(rng, tuple(COLOURS), obj.colour)
        return scene.with_object(index, colour=new), Edit(kind, index, obj.colour, new, obj)
    if kind == "shape":
        new = _other(rng, SHAPES, obj.shape)
        edited = replace(obj, shape=new)
        if not _fits(rest, edited, 0.02):  # shapes reach out differently (square corners)
            return None
        return scene.with_object(index, shape=new), Edit(kind, index, obj.shape, new, obj)
    if kind == "size":
        new = _other(rng, tuple(SIZES), obj.size)
        edited = replace(obj, size=new)
        r = edited.radius + 0.02  # where `sample_object` would place an object of the new size
        if not (_fits(rest, edited, 0.02) and r <= obj.cx <= 1 - r and r <= obj.cy <= 1 - r):
            return None
        return scene.with_object(index, size=new), Edit(kind, index, obj.size, new, obj)
    if kind == "count":
        copy = _free_spot(rng, list(scene.objects), obj, None)
        if copy is None:
            return None
        return replace(scene, objects=scene.objects + (copy,)), Edit(kind, index, "1", "2", obj)
    moved = _free_spot(rng, rest, obj, position_phrase(obj))
    if moved is None:
        return None
    return scene.with_object(index, cx=moved.cx, cy=moved.cy), Edit(
        kind, index, position_phrase(obj), position_phrase(moved), obj
    )


def relative_caption(edit: Edit, phrasing: int = 0, reverse: bool = False) -> str:
    """The caption naming `edit` (``reverse``: the edit back from the edited scene to the reference).

    Phrasing 0 (the benchmark's): "has a blue circle instead of a red one", "has a red star instead
    of a red circle", "has a large red circle instead of a small one", "has two red circles instead
    of one", "has the red circle on the left instead of in the center", "is on water instead of on
    sand". Phrasing 1: the same with ", not ..." (count: "also has a second red circle"; background:
    "is the same but on water").
    """
    if not 0 <= phrasing < PHRASINGS:
        raise ValueError(f"phrasing must be in [0, {PHRASINGS}), got {phrasing}")
    old, new = (edit.new, edit.old) if reverse else (edit.old, edit.new)
    joint = " instead of " if phrasing == 0 else ", not "
    if edit.kind == "background":
        if phrasing == 1:
            return f"is the same but {BACKGROUND_PHRASES[new]}"
        return f"is {BACKGROUND_PHRASES[new]} instead of {BACKGROUND_PHRASES[old]}"
    o = edit.edited_object()
    if edit.kind == "colour":
        return f"has {article(f'a {new} {o.shape}')}{joint}{article(f'a {old} one')}"
    if edit.kind == "shape":
        return f"has {article(f'a {o.colour} {new}')}{joint}{article(f'a {o.colour} {old}')}"
    if edit.kind == "size":
        return f"has a {new} {o.colour} {o.shape}{joint}a {old} one"
    if edit.kind == "count":
        if new == "2":
            return (
                f"has two {o.colour} {_plural(o.shape)} instead of one"
                if phrasing == 0
                else f"also has a second {o.colour} {o.shape}"
            )
        return (
            f"has one {o.colour} {o.shape} instead of two"
            if phrasing == 0
            else f"has only one {o.colour} {o.shape}, not two"
        )
    return f"has the {o.colour} {o.shape} {new}{joint}{old}"


def satisfies_edit(reference: Scene, edit: Edit, candidate: Scene) -> bool:
    """Does `candidate` show exactly what `edit`'s caption asks of `reference`? Its description
    (`describe`) must be the reference's with the one named attribute changed; for ``count`` the
    reference's plus one more object of that shape, colour and size, wherever it sits."""
    bg, objects = describe(reference)
    got_bg, got = describe(candidate)
    if edit.kind == "background":
        return (got_bg, got) == (edit.new, objects)
    o = edit.edited_object()
    old = (o.shape, o.colour, o.size, position_phrase(o))
    if got_bg != bg:
        return False
    items = Counter(objects)
    if edit.kind == "count":
        have = Counter(got)
        return any(
            have - Counter([extra]) == items and have[extra] > items[extra] for extra in have if extra[:3] == old[:3]
        )
    items[old] -= 1
    changed = list(old)
    changed[{"shape": 0, "colour": 1, "size": 2, "position": 3}[edit.kind]] = edit.new
    shape, colour, size, position = changed
    items[(shape, colour, size, position)] += 1
    return Counter(got) == +items


@dataclass(frozen=True)
class LooseQuery:
    """A CIRCO-style query: the reference gives the shape, the caption the rest ("shows a small blue
    one on water"). Any scene with an object of that shape, colour and size on that background
    satisfies it, whatever else it shows and wherever the object sits."""

    shape: str
    colour: str
    size: str
    background: str

    def caption(self) -> str:
        return f"shows a {self.size} {self.colour} one {BACKGROUND_PHRASES[self.background]}"

    def satisfied_by(self, scene: Scene) -> bool:
        return scene.background == self.background and any(
            (o.shape, o.colour, o.size) == (self.shape, self.colour, self.size) for o in scene.objects
        )
