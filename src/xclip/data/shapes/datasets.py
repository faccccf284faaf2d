"""Torch datasets over ShapesWorld, one per workflow. Images are float [3, S, S] in [0, 1];
normalisation for a model is the backbone's job (``backbone.normalize``)."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from xclip.data.shapes.generator import (
    SPLITS,
    ShapesSample,
    counterfactual,
    draw,
    image_tensor,
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
)


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

    def __init__(self, n: int = 1000, seed: int = 0, image_size: int = 64, max_objects: int = 3,
                 captions_per_image: int = 2, split: str = "val"):
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


class ShapesPretrain(_Sized):
    """Contrastive pretraining pairs with a hard negative: each item holds a scene and its
    counterfactual twin (one object's shape or colour changed), both with captions.

    Item: ``{"image": [2,3,S,S], "captions": [2 str]}``; the collate flattens twins into the batch.
    """

    def __init__(self, n: int = 100_000, seed: int = 0, image_size: int = 64, max_objects: int = 3,
                 short_caption_p: float = 0.5, split: str = "train"):
        super().__init__(n, seed, image_size, split)
        self.max_objects, self.short_caption_p = max_objects, short_caption_p

    def __getitem__(self, index: int) -> dict:
        rng = self._rng("pretrain", index)
        n_obj = int(rng.choice([1, 2, 3][: self.max_objects], p=_object_count_probs(self.max_objects)))
        scene = sample_scene(rng, n_objects=n_obj)
        twin = counterfactual(scene, rng)
        # full captions or short ones that always name the shape (`short_caption_p`); both twins
        # get the same style, so the captions differ exactly where the images do
        style = -1 if rng.random() >= self.short_caption_p else int(rng.integers(3))
        variant, prefix = int(rng.integers(2)), bool(rng.random() < 0.3)
        captions = [training_caption(sc, style, variant, prefix) for sc in (scene, twin)]
        if captions[0] == captions[1]:  # a shape-only caption cannot tell a colour change apart
            captions = [training_caption(sc, -1, variant, prefix) for sc in (scene, twin)]
        images = [render(sc, self.image_size, rng)[0] for sc in (scene, twin)]
        return {"image": image_tensor(np.stack(images)), "captions": captions}


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

    def __init__(self, n: int = 1000, seed: int = 0, image_size: int = 64, classes: tuple[str, ...] = ("square", "circle"),
                 places: tuple[str, ...] = ("land", "water"), correlation: float = 0.95, ood: str | None = None,
                 split: str = "val"):
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
            scene = Scene(place, (sample_object(rng, [], shapes=shapes),))
            label = -1 if self.ood else y
        image, instances = render(scene, self.image_size, rng)
        return {"image": image_tensor(image), "label": label, "place": place_idx,
                "mask": torch.from_numpy(instances > 0), "index": index}


CIR_KINDS = ("colour", "shape", "size", "background", "add", "remove")


class ShapesCIR(_Sized):
    """Composed image retrieval triplets: reference image, relative caption, target image.

    Item: ``{"reference", "target" [3,S,S], "caption", "kind", "index"}``; the gallery is the
    set of targets (``gallery_size`` = n).
    """

    def triplet(self, index: int) -> tuple[Scene, str, Scene, str, np.random.Generator]:
        rng = self._rng("cir", index)
        ref = sample_scene(rng, max_objects=2)
        kind = CIR_KINDS[int(rng.integers(len(CIR_KINDS)))]
        i = int(rng.integers(len(ref.objects)))
        obj = ref.objects[i]
        twins = sum(o.noun == obj.noun for o in ref.objects)
        if kind == "remove" and (len(ref.objects) < 2 or twins > 1):  # "has no X" must be true
            kind = "add"
        if kind == "colour":
            new = _other(rng, tuple(COLOURS), obj.colour)
            return ref, f"is {new} instead of {obj.colour}", ref.with_object(i, colour=new), kind, rng
        if kind == "shape":
            new = _other(rng, SHAPES, obj.shape)
            return ref, f"has a {new} instead of a {obj.shape}", ref.with_object(i, shape=new), kind, rng
        if kind == "size":
            new = "small" if obj.size == "large" else "large"
            return ref, f"has a {new} {obj.noun} instead of a {obj.size} one", ref.with_object(i, size=new), kind, rng
        if kind == "background":
            new = _other(rng, BACKGROUNDS, ref.background)
            return ref, f"is {BACKGROUND_PHRASES[new]}", replace(ref, background=new), kind, rng
        if kind == "remove":
            kept = tuple(o for j, o in enumerate(ref.objects) if j != i)
            return ref, f"has no {obj.noun}", replace(ref, objects=kept), kind, rng
        added = sample_object(rng, list(ref.objects))
        if added is None:  # no room: change the colour instead, still a valid triplet
            new = _other(rng, tuple(COLOURS), obj.colour)
            return ref, f"is {new} instead of {obj.colour}", ref.with_object(i, colour=new), "colour", rng
        return ref, f"also has {article('a ' + added.noun)}", replace(ref, objects=ref.objects + (added,)), kind, rng

    def __getitem__(self, index: int) -> dict:
        ref, text, target, kind, rng = self.triplet(index)
        ref_img, _ = render(ref, self.image_size, rng)
        tgt_img, _ = render(target, self.image_size, rng)
        return {"reference": image_tensor(ref_img), "target": image_tensor(tgt_img), "caption": text,
                "kind": kind, "index": index}


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
        return {"prompt": caption(scene), "images": image_tensor(np.stack(images)), "errors": errors,
                "error_masks": torch.from_numpy(np.stack(masks)),
                "faithful": torch.tensor([e == "none" for e in errors]), "index": index}


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
        text = article(f"a {size_word}{obj.colour} object {position_phrase(obj)} {BACKGROUND_PHRASES[scene.background]}")
        return {"image": image_tensor(image), "text": text, "type": SHAPES.index(obj.shape),
                "severity": tuple(SIZES).index(obj.size), "index": index}


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
        obj = sample_object(rng, [])
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
        return {"image": image_tensor(image), "text": note,
                "labels": {"shape": SHAPES.index(obj.shape), "background": BACKGROUNDS.index(background)},
                "mask": torch.from_numpy(instances == 1), "deciding_word": background, "index": index}
