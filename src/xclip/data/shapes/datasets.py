"""Torch datasets over ShapesWorld, one per workflow. Images are float [3, S, S] in [0, 1];
normalisation for a model is the backbone's job (``backbone.normalize``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from xclip.data.shapes.edits import (
    EDIT_KINDS,
    PHRASINGS,
    Edit,
    LooseQuery,
    apply_edit,
    relative_caption,
)
from xclip.data.shapes.generator import (
    SPLITS,
    ShapesSample,
    counterfactual,
    draw,
    image_tensor,
    part_rng,
    relocated,
    sample_rng,
    training_caption,
)
from xclip.data.shapes.render import object_mask, render
from xclip.data.shapes.scene import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    article,
    caption,
    position_phrase,
    sample_object,
    sample_scene,
    short_caption,
)


def _first_object(
    rng: np.random.Generator,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
    sizes: tuple[str, ...] = tuple(SIZES),
) -> ShapeObject:
    """`sample_object` on an empty canvas (its defaults), which places it at the first try."""
    obj = sample_object(rng, [], shapes=shapes, colours=colours, sizes=sizes)
    assert obj is not None  # nothing placed to overlap
    return obj


class _Sized(Dataset):
    """`n` samples of one stream under `seed`; ``split="test"`` draws them from the test key
    family of :func:`sample_rng`, disjoint from every training and validation sample."""

    def __init__(self, n: int = 1000, seed: int = 0, image_size: int = 64, split: str = "val"):
        if n <= 0:
            raise ValueError(f"a ShapesWorld dataset needs n > 0 samples, got n={n}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.n, self.seed, self.image_size, self.split = int(n), int(seed), int(image_size), split

    def __len__(self) -> int:
        return self.n

    def _rng(self, stream: str, index: int) -> np.random.Generator:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return sample_rng(self.seed, stream, index, self.split)


class ShapesCaptions(_Sized):
    """Image-caption retrieval: 1..`max_objects` objects, `captions_per_image` full captions.

    Item: ``{"image": [3,S,S], "captions": list[str], "index": int}``.
    """

    def __init__(
        self,
        n: int = 1000,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 3,
        captions_per_image: int = 2,
        split: str = "val",
    ):
        super().__init__(n, seed, image_size, split)
        self.max_objects, self.captions_per_image = max_objects, captions_per_image

    def sample(self, index: int) -> ShapesSample:
        rng = self._rng("captions", index)
        scene = sample_scene(rng, max_objects=self.max_objects)
        return draw(scene, self.image_size, rng, self.captions_per_image)

    def __getitem__(self, index: int) -> dict:
        s = self.sample(index)
        return {"image": s.tensor(), "captions": s.captions, "index": index}


class ShapesClassification(_Sized):
    """Single-object images with their attribute labels (zero-shot classification).

    Item: ``{"image", "mask" [S,S] bool, "shape", "colour", "size", "background" (class ids),
    "caption", "index"}``; class names in ``ShapesClassification.classes``.
    """

    classes = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "background": BACKGROUNDS}

    def sample(self, index: int) -> ShapesSample:
        rng = self._rng("classification", index)
        return draw(sample_scene(rng, n_objects=1), self.image_size, rng, 1)

    def __getitem__(self, index: int) -> dict:
        s = self.sample(index)
        obj = s.scene.objects[0]
        return {
            "image": s.tensor(),
            "mask": torch.from_numpy(s.instances == 1),
            "shape": SHAPES.index(obj.shape),
            "colour": tuple(COLOURS).index(obj.colour),
            "size": tuple(SIZES).index(obj.size),
            "background": BACKGROUNDS.index(s.scene.background),
            "caption": s.captions[0],
            "index": index,
        }


TWIN_EDITS = ("shape_colour", "all")


class ShapesPretrain(_Sized):
    """Contrastive pretraining pairs with a hard negative: each item holds a scene and its
    counterfactual twin, both with captions.

    ``twin_edits="shape_colour"`` (the shipped tiny-shapes recipe): one object's shape (70%) or
    colour (30%) changed. ``"all"``: one edit of `xclip.data.shapes.edits.EDIT_KINDS` (colour,
    shape, size, count, position, background; uniformly, colour where the drawn one does not fit).
    With probability `relative_caption_p` (``"all"`` only) the pair is captioned *relative to each
    other*: each image's caption describes its twin and names the difference, "a photo of a red
    circle on sand that has a blue circle instead of a red one" (phrasings with "instead of",
    "not", "also", "but"; for colour, size and background edits of a one-object twin also "a photo
    of a red circle on sand that shows a small blue one on water"), so the text tower learns what
    relative captions say. Pairs whose plain captions would be equal (a move that keeps every
    relation) are always captioned relatively.

    Item: ``{"image": [2,3,S,S], "captions": [2 str]}``; the collate flattens twins into the batch.
    """

    def __init__(
        self,
        n: int = 100_000,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 3,
        short_caption_p: float = 0.5,
        split: str = "train",
        twin_edits: str = "shape_colour",
        relative_caption_p: float = 0.0,
    ):
        super().__init__(n, seed, image_size, split)
        if twin_edits not in TWIN_EDITS:
            raise ValueError(f"twin_edits must be one of {TWIN_EDITS}, got {twin_edits!r}")
        if not 0.0 <= relative_caption_p <= 1.0 or (relative_caption_p > 0 and twin_edits != "all"):
            raise ValueError(
                f"relative_caption_p must be in [0, 1] and needs twin_edits='all', got "
                f"{relative_caption_p} with twin_edits={twin_edits!r}"
            )
        self.max_objects, self.short_caption_p = max_objects, short_caption_p
        self.twin_edits, self.relative_caption_p = twin_edits, relative_caption_p

    def pair(self, index: int) -> tuple[Scene, Scene, list[str], np.random.Generator]:
        """(scene, twin, their captions, the generator positioned for rendering) of item `index`."""
        rng = self._rng("pretrain", index)
        n_obj = int(rng.choice([1, 2, 3][: self.max_objects], p=_object_count_probs(self.max_objects)))
        scene = sample_scene(rng, n_objects=n_obj)
        edit = None
        if self.twin_edits == "all":
            twin, edit = _edited_twin(scene, rng)
        else:
            twin = counterfactual(scene, rng)
        # full captions or short ones that always name the shape (`short_caption_p`); both twins
        # get the same style, so the captions differ exactly where the images do
        style = -1 if rng.random() >= self.short_caption_p else int(rng.integers(3))
        variant, prefix = int(rng.integers(2)), bool(rng.random() < 0.3)
        if edit is not None and rng.random() < self.relative_caption_p:
            return scene, twin, relative_pair_captions(scene, twin, edit, rng), rng
        captions = [training_caption(sc, style, variant, prefix) for sc in (scene, twin)]
        if captions[0] == captions[1]:  # a shape-only caption cannot tell a colour change apart
            captions = [training_caption(sc, -1, variant, prefix) for sc in (scene, twin)]
        if captions[0] == captions[1] and edit is not None:  # a move that keeps every relation
            captions = relative_pair_captions(scene, twin, edit, rng)
        return scene, twin, captions, rng

    def __getitem__(self, index: int) -> dict:
        scene, twin, captions, rng = self.pair(index)
        images = [render(sc, self.image_size, rng)[0] for sc in (scene, twin)]
        return {"image": image_tensor(np.stack(images)), "captions": captions}


def _edited_twin(scene: Scene, rng: np.random.Generator) -> tuple[Scene, Edit]:
    """`scene` with one edit of a random kind to a random object (colour when the kind does not fit)."""
    i = int(rng.integers(len(scene.objects)))
    kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    if kind in ("count", "position") and sum(o.noun == scene.objects[i].noun for o in scene.objects) > 1:
        kind = "colour"  # "the red circle" / "two red circles instead of one" need a unique noun
    edited = apply_edit(scene, kind, i, rng)
    if edited is None:
        edited = apply_edit(scene, "colour", i, rng)
        assert edited is not None  # a colour edit keeps the object's outline: it always fits
    return edited


# CLIP's tiny text tower reads 32 tokens (30 between start and end); every ShapesWorld word is one
# BPE token but "triangles" (two), and each comma is one.
CONTEXT_WORDS = 30


def _tokens_estimate(text: str) -> int:
    return len(text.replace(",", " ,").replace(".", " .").split()) + text.count("triangles")


def _describe_for_relative(scene: Scene, change: str, rng: np.random.Generator) -> str:
    """A description of a twin short enough that "a photo of {it} that {change}" fits the context:
    the full caption of a one-object scene when it fits, else a short one (with the background when
    that fits)."""
    options = [caption(scene, int(rng.integers(2)))] if len(scene.objects) == 1 else []
    options += [short_caption(scene, 2), short_caption(scene, 0)]
    if len(scene.objects) == 2 and rng.random() < 0.5:
        options.remove(short_caption(scene, 2))
    for text in options:
        if _tokens_estimate(f"a photo of {text} that {change}") <= CONTEXT_WORDS:
            return text
    raise ValueError(f"no description of {scene} fits beside {change!r} in {CONTEXT_WORDS} tokens")


def relative_pair_captions(scene: Scene, twin: Scene, edit: Edit, rng: np.random.Generator) -> list[str]:
    """Captions of (scene, twin) relative to each other: each describes the other image and names
    the edit that turns it into this one (`xclip.data.shapes.edits.relative_caption`)."""
    phrasing = int(rng.integers(PHRASINGS))
    out = []
    for other, reverse, own in ((twin, True, scene), (scene, False, twin)):
        change = relative_caption(edit, phrasing, reverse=reverse)
        if edit.kind in ("colour", "size", "background") and len(other.objects) == 1 and rng.random() < 0.3:
            obj = own.objects[max(edit.index, 0)]  # the one object, as this image shows it
            change = LooseQuery(obj.shape, obj.colour, obj.size, own.background).caption()
        out.append(f"a photo of {_describe_for_relative(other, change, rng)} that {change}")
    return out


def _object_count_probs(max_objects: int) -> list[float]:
    p = np.array([0.45, 0.35, 0.2][:max_objects])
    return list(p / p.sum())


class SpuriousShapes(_Sized):
    """WaterBirds-like spurious-background classification and its OOD sets.

    In-distribution: one object of class ``classes[y]`` on background ``places[y]`` with
    probability `correlation` (else the other place). ``ood="background"``: background only;
    ``ood="novel_shape"``: a shape outside `classes`. Item: ``{"image", "label" (-1 for OOD),
    "place", "mask", "index"}``.
    """

    def __init__(
        self,
        n: int = 1000,
        seed: int = 0,
        image_size: int = 64,
        classes: tuple[str, ...] = ("square", "circle"),
        places: tuple[str, ...] = ("land", "water"),
        correlation: float = 0.95,
        ood: str | None = None,
        split: str = "val",
    ):
        super().__init__(n, seed, image_size, split)
        unknown = [c for c in classes if c not in SHAPES]
        if unknown or len(classes) != len(places):
            raise ValueError(f"classes {classes} must be ShapesWorld shapes, one per place in {places}")
        if ood not in (None, "background", "novel_shape"):
            raise ValueError(f"ood must be None, 'background' or 'novel_shape', got {ood!r}")
        self.classes, self.places, self.correlation, self.ood = tuple(classes), tuple(places), correlation, ood
        self.novel_shapes = tuple(s for s in SHAPES if s not in self.classes)

    def __getitem__(self, index: int) -> dict:
        rng = self._rng("spurious", index)
        y = int(rng.integers(len(self.classes)))
        if rng.random() < self.correlation:
            place_idx = y
        else:  # one of the other places, so agreement is exactly `correlation` in expectation
            others = [p for p in range(len(self.places)) if p != y]
            place_idx = others[int(rng.integers(len(others)))]
        place = self.places[place_idx]
        if self.ood == "background":
            scene, label = Scene(place, ()), -1
        else:
            shapes = self.novel_shapes if self.ood == "novel_shape" else (self.classes[y],)
            scene = Scene(place, (_first_object(rng, shapes=shapes),))
            label = -1 if self.ood else y
        image, instances = render(scene, self.image_size, rng)
        return {
            "image": image_tensor(image),
            "label": label,
            "place": place_idx,
            "mask": torch.from_numpy(instances > 0),
            "index": index,
        }


CIR_KINDS = EDIT_KINDS
SET_SIZE = 1 + len(CIR_KINDS)  # a reference and one variant per edit kind


@dataclass(frozen=True)
class CIRSet:
    """A reference scene with one single-edit variant per kind of `CIR_KINDS` (same order), all of
    one object (``edited``) but the background edit; ``captions[k]`` names ``edits[k]``."""

    reference: Scene
    edited: int
    variants: tuple[Scene, ...]
    edits: tuple[Edit, ...]
    captions: tuple[str, ...]

    def scenes(self) -> tuple[Scene, ...]:
        """The set's images: the reference (slot 0), then the variants (slot 1 + k)."""
        return (self.reference, *self.variants)


class ShapesCIR(_Sized):
    """Composed image retrieval with hard negatives, CIRR-style: every reference scene (1-2
    objects with distinct colour + shape nouns) comes with a *set* of single-edit variants of itself
    (colour, shape, size, count, position, background of one object, one at a time), and each variant
    is the target of one query whose caption names exactly its edit ("has a blue circle instead of a
    red one"). Within a set only the caption tells the variants apart; a method that ignores it (the
    reference image alone) finds the target among the 6 variants at chance.

    Query ``i`` is reference set ``i // 6`` edited by ``CIR_KINDS[i % 6]``, so `n` queries cover
    ``ceil(n / 6)`` sets and every complete set is queried once per kind. Item: ``{"reference",
    "target" [3,S,S], "caption", "kind", "index"}``; a set's images render the same for every query.
    """

    def __init__(self, n: int = 600, seed: int = 0, image_size: int = 64, max_objects: int = 2, split: str = "val"):
        super().__init__(n, seed, image_size, split)
        if not 1 <= max_objects <= 2:
            raise ValueError(
                f"CIR references hold 1 or 2 objects (so an edited scene fits), got max_objects={max_objects}"
            )
        self.max_objects = max_objects
        self._sets: dict[int, CIRSet] = {}

    @property
    def n_sets(self) -> int:
        return -(-self.n // len(CIR_KINDS))

    def reference_set(self, r: int) -> CIRSet:
        """Reference set `r`: a scene of 1..`max_objects` objects (uniformly) with distinct nouns and an
        object whose every edit fits (its objects tried in random order; the layout redrawn with the
        same number of objects when none fits)."""
        if r not in self._sets:
            if not 0 <= r < self.n_sets:
                raise IndexError(f"reference set {r} out of range for {self.n_sets} sets")
            rng = self._rng("cir", r)
            n_objects = int(rng.integers(1, self.max_objects + 1))  # drawn once: crowded scenes are redrawn
            edited: list = []
            while not edited:
                ref = sample_scene(rng, n_objects=n_objects)
                if len({o.noun for o in ref.objects}) < len(ref.objects):  # "the red circle" must name one object
                    continue
                for i in (int(j) for j in rng.permutation(len(ref.objects))):  # the first object every edit fits
                    edited = [apply_edit(ref, kind, i, rng) for kind in CIR_KINDS]
                    if all(e is not None for e in edited):
                        break
                    edited = []
            self._sets[r] = CIRSet(
                ref,
                i,
                tuple(e[0] for e in edited),
                tuple(e[1] for e in edited),
                tuple(relative_caption(e[1]) for e in edited),
            )
        return self._sets[r]

    def triplet(self, index: int) -> tuple[Scene, str, Scene, str]:
        """(reference scene, caption, target scene, kind) of query `index`."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        s, k = self.reference_set(index // len(CIR_KINDS)), index % len(CIR_KINDS)
        return s.reference, s.captions[k], s.variants[k], CIR_KINDS[k]

    def render_slot(self, r: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and instance map of slot `slot` of set `r` (0: the reference, 1 + k: variant k)."""
        scene = self.reference_set(r).scenes()[slot]
        return render(scene, self.image_size, part_rng(self.seed, "cir", r, slot, self.split))

    def __getitem__(self, index: int) -> dict:
        _, text, _, kind = self.triplet(index)
        r, k = divmod(index, len(CIR_KINDS))
        return {
            "reference": image_tensor(self.render_slot(r, 0)[0]),
            "target": image_tensor(self.render_slot(r, 1 + k)[0]),
            "caption": text,
            "kind": kind,
            "index": index,
        }


@dataclass(frozen=True)
class CIRCOQuery:
    """A CIRCO-style query: a one-object reference and a caption (`LooseQuery`) that several scenes
    satisfy. ``planted`` satisfy it (the first is the query's target), ``negatives`` do not (the
    caption's colour, size and background on another shape; the reference's shape unedited)."""

    reference: Scene
    loose: LooseQuery
    planted: tuple[Scene, ...]
    negatives: tuple[Scene, ...]

    def scenes(self) -> tuple[Scene, ...]:
        """The query's images: the reference (slot 0), the planted ground truths, the negatives."""
        return (self.reference, *self.planted, *self.negatives)


class ShapesCIRCO(_Sized):
    """CIRCO-style composed queries: the reference (one object) gives the shape, the caption the
    rest ("shows a small blue one on water"), and every scene with such an object on that background
    is a ground truth, wherever it sits and whatever else it shows. Each query plants `n_planted`
    scenes that satisfy it and two that do not (`CIRCOQuery`); a benchmark's ground-truth set is every
    gallery image that satisfies the caption (`LooseQuery.satisfied_by`), planted or not.

    Item: ``{"reference" [3,S,S], "planted" [P,3,S,S], "negatives" [2,3,S,S], "caption", "index"}``.
    """

    def __init__(self, n: int = 100, seed: int = 0, image_size: int = 64, n_planted: int = 3, split: str = "val"):
        super().__init__(n, seed, image_size, split)
        if n_planted < 1:
            raise ValueError(f"n_planted must be >= 1 (the target), got {n_planted}")
        self.n_planted = n_planted
        self._queries: dict[int, CIRCOQuery] = {}

    def query(self, index: int) -> CIRCOQuery:
        if index not in self._queries:
            rng = self._rng("circo", index)
            ref = sample_scene(rng, n_objects=1)
            obj = ref.objects[0]
            loose = LooseQuery(
                obj.shape,
                _other(rng, tuple(COLOURS), obj.colour),
                tuple(SIZES)[int(rng.integers(2))],
                BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
            )
            planted = tuple(
                _scene_with(rng, loose.shape, loose.colour, loose.size, loose.background) for _ in range(self.n_planted)
            )
            other_shape = _other(rng, SHAPES, loose.shape)
            negatives = (
                _scene_with(rng, other_shape, loose.colour, loose.size, loose.background, loose),
                _scene_with(rng, loose.shape, obj.colour, loose.size, loose.background, loose),
            )
            self._queries[index] = CIRCOQuery(ref, loose, planted, negatives)
        return self._queries[index]

    def render_slot(self, index: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and instance map of slot `slot` of query `index` (see `CIRCOQuery.scenes`)."""
        scene = self.query(index).scenes()[slot]
        return render(scene, self.image_size, part_rng(self.seed, "circo", index, slot, self.split))

    def __getitem__(self, index: int) -> dict:
        q = self.query(index)
        images = [image_tensor(self.render_slot(index, s)[0]) for s in range(len(q.scenes()))]
        return {
            "reference": images[0],
            "planted": torch.stack(images[1 : 1 + len(q.planted)]),
            "negatives": torch.stack(images[1 + len(q.planted) :]),
            "caption": q.loose.caption(),
            "index": index,
        }


def _scene_with(
    rng: np.random.Generator, shape: str, colour: str, size: str, background: str, avoid: LooseQuery | None = None
) -> Scene:
    """A scene on `background` with a (shape, colour, size) object and maybe one random other object;
    with `avoid`, none that satisfies it (redrawn)."""
    while True:
        first = _first_object(rng, shapes=(shape,), colours=(colour,), sizes=(size,))
        objects = [first]
        if rng.random() < 0.5:
            other = sample_object(rng, objects)
            if other is not None:
                objects.append(other)
        order = rng.permutation(len(objects))
        scene = Scene(background, tuple(objects[int(j)] for j in order))
        if avoid is None or not avoid.satisfied_by(scene):
            return scene


def _other(rng: np.random.Generator, options, current):
    rest = [o for o in options if o != current]
    return rest[int(rng.integers(len(rest)))]


FAITHFULNESS_ERRORS = ("colour", "count", "position", "missing")


class ShapesFaithfulness(_Sized):
    """Prompt-faithfulness sets: a prompt and `n_renderings` images, each either faithful
    (``"none"``) or with one controlled error, plus the error's pixel mask.

    Item: ``{"prompt", "images" [R,3,S,S], "errors" list[str], "error_masks" [R,S,S] bool,
    "faithful" [R] bool, "index"}``. At least one rendering is faithful and one is not.
    """

    def __init__(self, n: int = 200, seed: int = 0, image_size: int = 64, n_renderings: int = 4, split: str = "val"):
        super().__init__(n, seed, image_size, split)
        if n_renderings < 2:
            raise ValueError("n_renderings must be >= 2 (one faithful, one with an error)")
        self.n_renderings = n_renderings

    def __getitem__(self, index: int) -> dict:
        rng = self._rng("faithfulness", index)
        scene = sample_scene(rng, max_objects=2)
        kinds = ["none"] + [FAITHFULNESS_ERRORS[int(rng.integers(4))] for _ in range(self.n_renderings - 2)]
        kinds.append(FAITHFULNESS_ERRORS[int(rng.integers(4))])
        kinds = [kinds[int(j)] for j in rng.permutation(len(kinds))]
        images, masks, errors = [], [], []
        for kind in kinds:
            shown, mask, kind = _with_error(scene, kind, rng, self.image_size)
            image, _ = render(shown, self.image_size, rng)
            images.append(image)
            masks.append(mask)
            errors.append(kind)
        return {
            "prompt": caption(scene),
            "images": image_tensor(np.stack(images)),
            "errors": errors,
            "error_masks": torch.from_numpy(np.stack(masks)),
            "faithful": torch.tensor([e == "none" for e in errors]),
            "index": index,
        }


def _with_error(scene: Scene, kind: str, rng: np.random.Generator, size: int) -> tuple[Scene, np.ndarray, str]:
    """`scene` with one error of `kind` and the error's mask (old and new pixels of the changed
    object). Falls back to a colour error when the scene leaves no room for the asked one."""
    empty = np.zeros((size, size), bool)
    if kind == "none":
        return scene, empty, kind
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    if kind == "count":
        extra = sample_object(rng, list(scene.objects), shapes=(obj.shape,), colours=(obj.colour,), sizes=(obj.size,))
        if extra is not None:
            return replace(scene, objects=scene.objects + (extra,)), object_mask(extra, size), kind
    elif kind == "missing":
        kept = tuple(o for j, o in enumerate(scene.objects) if j != i)
        return replace(scene, objects=kept), object_mask(obj, size), kind
    elif kind == "position":
        for _ in range(10):
            moved = relocated(scene, i, rng)
            if moved is not None and caption(moved) != caption(scene):
                return moved, object_mask(obj, size) | object_mask(moved.objects[i], size), kind
    new = _other(rng, tuple(COLOURS), obj.colour)
    return scene.with_object(i, colour=new), object_mask(obj, size), "colour"


class ShapesMultimodal(_Sized):
    """Image + text classification records (the Teacher/Student workflow).

    Labels: ``type`` = the object's shape, ``severity`` = its size. The description names the
    colour and background, and the size only half the time, so both modalities carry signal.
    Item: ``{"image", "text", "type", "severity", "index"}``.
    """

    label_names = {"type": SHAPES, "severity": tuple(SIZES)}

    def __getitem__(self, index: int) -> dict:
        rng = self._rng("multimodal", index)
        scene = sample_scene(rng, n_objects=1)
        obj = scene.objects[0]
        image, _ = render(scene, self.image_size, rng)
        size_word = f"{obj.size} " if rng.random() < 0.5 else ""
        text = article(
            f"a {size_word}{obj.colour} object {position_phrase(obj)} {BACKGROUND_PHRASES[scene.background]}"
        )
        return {
            "image": image_tensor(image),
            "text": text,
            "type": SHAPES.index(obj.shape),
            "severity": tuple(SIZES).index(obj.size),
            "index": index,
        }


# Note templates of `ShapesNotes`: every word but the background's name is shared by all the
# background classes, so the name is the one deciding word of the note.
NOTE_TEMPLATES = (
    "a {size} {colour} object {position} on a {background} background",
    "{colour} object, {size}, {position}; {background} background",
    "on a {background} background: one {size} {colour} object {position}",
)


class ShapesNotes(_Sized):
    """Image + note records where each task has one deciding modality with a known deciding part
    (the Teacher/Student workflow's embedded data).

    - ``shape`` (decided by the image): the object's shape; the note never names it, and the
      deciding region is the object's pixel mask (``mask``).
    - ``background`` (decided by the note): the background class; the note names it with one word
      (``deciding_word``), while the image is always drawn on the plain background, so the pixels
      carry no information about it.

    The note's other words (colour, size, position) are visible in the image but independent of
    both labels. Item: ``{"image" [3,S,S], "text", "labels": {"shape", "background"} (class ids),
    "mask" [S,S] bool, "deciding_word", "index"}``.
    """

    label_names: ClassVar[dict[str, tuple[str, ...]]] = {"shape": SHAPES, "background": BACKGROUNDS}
    deciding_modality: ClassVar[dict[str, str]] = {"shape": "image", "background": "text"}

    def record(self, index: int) -> tuple[ShapeObject, str, str, np.random.Generator]:
        """(the object, the background label, the note, the generator positioned for rendering)."""
        rng = self._rng("notes", index)
        obj = _first_object(rng)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        template = NOTE_TEMPLATES[int(rng.integers(len(NOTE_TEMPLATES)))]
        note = template.format(size=obj.size, colour=obj.colour, position=position_phrase(obj), background=background)
        return obj, background, article(note), rng

    def note(self, index: int) -> str:
        """The note of item `index` without rendering its image (tokenizer training)."""
        return self.record(index)[2]

    def __getitem__(self, index: int) -> dict:
        obj, background, note, rng = self.record(index)
        image, instances = render(Scene("plain", (obj,)), self.image_size, rng)
        return {
            "image": image_tensor(image),
            "text": note,
            "labels": {"shape": SHAPES.index(obj.shape), "background": BACKGROUNDS.index(background)},
            "mask": torch.from_numpy(instances == 1),
            "deciding_word": background,
            "index": index,
        }
