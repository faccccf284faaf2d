"""ShapesWorld (xclip.data.shapes): determinism, masks vs pixels, captions vs scene graphs,
resolution independence, every dataset's labels against its pixels, and the DataModule.

Everything runs at 64 px (a few checks at 224 px) so the whole file stays well under 30 s on
2 busy CPU cores.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

import xclip.data.shapes.datasets as shapes_datasets
from xclip.data.shapes import (
    BACKGROUNDS,
    CIR_KINDS,
    COLOURS,
    FAITHFULNESS_ERRORS,
    SHAPES,
    SIZES,
    TASKS,
    Scene,
    ShapeObject,
    ShapesCaptions,
    ShapesCIR,
    ShapesCIRCO,
    ShapesClassification,
    ShapesFaithfulness,
    ShapesMultimodal,
    ShapesPretrain,
    ShapesWorldDataModule,
    SpuriousShapes,
    caption,
    generate,
    object_mask,
    render,
    satisfies_edit,
)
from xclip.data.shapes.scene import BACKGROUND_PHRASES, RELATIONS, article

S = 64
PLURALS = {s: s + ("es" if s.endswith(("s", "sh", "ch", "x")) else "s") for s in SHAPES}
INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


# ----------------------------------------------------------------------------- helpers


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a boolean mask in pixel units (y grows downwards)."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def centroid_relation(a: np.ndarray, b: np.ndarray) -> tuple[str, float]:
    """Where mask `a` is relative to mask `b` by dominant axis, and how dominant (pixels)."""
    (ax, ay), (bx, by) = centroid(a), centroid(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        rel = "to the left of" if dx < 0 else "to the right of"
    else:
        rel = "above" if dy < 0 else "below"
    return rel, abs(abs(dx) - abs(dy))


def downsample_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Sample a square mask at the centres of a `size` x `size` grid."""
    big = mask.shape[0]
    idx = np.floor((np.arange(size) + 0.5) * big / size).astype(int)
    return mask[np.ix_(idx, idx)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float [3, S, S] in [0, 1] -> uint8 [S, S, 3] (exact inverse of image_tensor)."""
    # numpy, not torch: torch's elementwise ops contend for the cores a training run is using
    return np.rint(image.numpy() * 255).astype(np.uint8).transpose(1, 2, 0)


def colour_pixels(image_u8: np.ndarray, colour: str) -> np.ndarray:
    return (image_u8 == np.asarray(COLOURS[colour], np.uint8)).all(-1)


def colours_present(image_u8: np.ndarray, min_pixels: int = 20) -> set[str]:
    return {c for c in COLOURS if colour_pixels(image_u8, c).sum() >= min_pixels}


def groups_of(scene: Scene) -> Counter:
    return Counter((o.colour, o.shape) for o in scene.objects)


def group_regex(colour: str, shape: str, count: int) -> str:
    count_word = {1: "an?", 2: "two", 3: "three"}[count]
    noun = shape if count == 1 else PLURALS[shape]
    return rf"\b{count_word} (?:small |large )?{colour} {noun}\b"


def background_means() -> dict[str, np.ndarray]:
    """Mean RGB of each empty background at 64 px (reference for background labels)."""
    return {bg: render(Scene(bg, ()), S)[0].reshape(-1, 3).astype(float).mean(0) for bg in BACKGROUNDS}


def nearest_background(image_u8: np.ndarray, mask: np.ndarray, means: dict[str, np.ndarray]) -> str:
    mean = image_u8[~mask].reshape(-1, 3).astype(float).mean(0)
    return min(means, key=lambda bg: np.linalg.norm(means[bg] - mean))


def bbox_fill(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def items_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(items_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.numpy(), b.numpy())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(items_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def scenes64():
    """400 generated samples (seed 0) at 64 px, shared by the mask and caption tests."""
    return [generate(0, i, size=S) for i in range(400)]


# ----------------------------------------------------------------------------- 1. determinism


def test_generate_is_byte_identical_in_any_order():
    forward = {i: generate(7, i) for i in range(40)}
    backward = {i: generate(7, i) for i in reversed(range(40))}
    shuffled = {int(i): generate(7, int(i)) for i in np.random.default_rng(1).permutation(40)}
    for i in range(40):
        for other in (backward[i], shuffled[i]):
            assert forward[i].image.tobytes() == other.image.tobytes()
            assert forward[i].instances.tobytes() == other.instances.tobytes()
            assert forward[i].scene == other.scene
            assert forward[i].captions == other.captions
    # the samples are not all the same picture
    assert len({s.image.tobytes() for s in forward.values()}) == 40


def test_different_seeds_give_different_images():
    for i in range(20):
        a, b = generate(0, i), generate(1, i)
        assert a.image.tobytes() != b.image.tobytes()
    assert sum(generate(0, i).scene != generate(1, i).scene for i in range(20)) == 20


DATASET_CLASSES = {
    "captions": ShapesCaptions,
    "classification": ShapesClassification,
    "spurious": SpuriousShapes,
    "cir": ShapesCIR,
    "faithfulness": ShapesFaithfulness,
    "multimodal": ShapesMultimodal,
    "pretrain": ShapesPretrain,
}
DATASET_FACTORIES = {
    "captions": lambda seed: ShapesCaptions(30, seed, S),
    "classification": lambda seed: ShapesClassification(30, seed, S),
    "spurious": lambda seed: SpuriousShapes(30, seed, S),
    "cir": lambda seed: ShapesCIR(30, seed, S),
    "faithfulness": lambda seed: ShapesFaithfulness(30, seed, S),
    "multimodal": lambda seed: ShapesMultimodal(30, seed, S),
    "pretrain": lambda seed: ShapesPretrain(30, seed, S),
}


@pytest.mark.parametrize("name", sorted(DATASET_FACTORIES))
def test_dataset_items_identical_across_instances_and_access_order(name):
    make = DATASET_FACTORIES[name]
    a, b = make(5), make(5)
    order = np.random.default_rng(0).permutation(len(b))
    items_a = [a[i] for i in range(len(a))]
    items_b = {int(i): b[int(i)] for i in order}
    for i in range(len(a)):
        assert items_equal(items_a[i], items_b[i]), f"{name}[{i}] differs between instances"
    # a different seed gives different data
    c = make(6)
    assert sum(not items_equal(items_a[i], c[i]) for i in range(len(a))) >= len(a) - 1


def test_captions_dataset_matches_generate():
    ds = ShapesCaptions(25, seed=3)
    for i in (24, 0, 11, 3):
        item, ref = ds[i], generate(3, i)
        assert np.array_equal(to_uint8(item["image"]), ref.image)
        assert item["captions"] == ref.captions
        assert item["index"] == i
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, S, S)
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_dataset_index_out_of_range():
    ds = ShapesCaptions(5, seed=0)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-1]


# ----------------------------------------------------------------------------- 2. masks vs pixels


def test_visible_object_pixels_have_exact_object_colour(scenes64):
    for s in scenes64:
        n = len(s.scene.objects)
        assert s.image.dtype == np.uint8 and s.image.shape == (S, S, 3)
        assert s.instances.dtype == np.int8 and s.instances.shape == (S, S)
        assert 1 <= n <= 3
        assert set(np.unique(s.instances)) <= set(range(n + 1))
        masks = s.object_masks()
        assert masks.shape == (n, S, S)
        for k, obj in enumerate(s.scene.objects):
            vis = s.instances == k + 1
            assert np.array_equal(masks[k], vis)
            assert vis.sum() > 0, f"object {k} of {s.scene} is invisible"
            assert (s.image[vis] == COLOURS[obj.colour]).all()
        assert (s.instances == 0).sum() > 0


def test_objects_do_not_overlap_in_generated_scenes(scenes64):
    """Each object's visible pixels are its full mask rendered alone (no occlusion)."""
    for s in scenes64:
        for k, obj in enumerate(s.scene.objects):
            assert np.array_equal(s.instances == k + 1, object_mask(obj, S)), s.scene


def test_overlapping_objects_occlude_in_drawing_order():
    # a hand-built scene whose objects really overlap (the generator never places such scenes)
    below = ShapeObject("square", "red", "large", 0.45, 0.5)
    above = ShapeObject("circle", "blue", "large", 0.6, 0.5)
    m_below, m_above = object_mask(below, S), object_mask(above, S)
    assert (m_below & m_above).sum() > 50  # they really overlap
    image, instances = render(Scene("plain", (below, above)), S)
    assert np.array_equal(instances == 2, m_above)  # the later object is whole
    assert np.array_equal(instances == 1, m_below & ~m_above)  # the earlier one is covered where they meet
    assert (image[m_below & m_above] == COLOURS["blue"]).all()
    assert (image[m_below & ~m_above] == COLOURS["red"]).all()


# analytic areas in units of r^2 (r = object radius in pixels)
_theta = np.linspace(0.0, 2 * np.pi, 200_001)
_STAR_AREA = 0.5 * float(np.mean((0.45 + 0.55 * np.abs(np.cos(2.5 * _theta)) ** 3) ** 2)) * 2 * np.pi
ANALYTIC_AREA = {
    "circle": math.pi,  # pi r^2
    "square": (2 * 0.82) ** 2,  # side 1.64 r
    "cross": 2 * (2 * 0.6) - 0.6**2,  # two 2r x 0.6r bars minus their overlap
    "triangle": 3 * math.sqrt(3) / 4 * 1.15**2,  # equilateral, circumradius 1.15 r
    "star": _STAR_AREA,  # polar curve r (0.45 + 0.55 |cos 2.5 t|^3)
}


@pytest.mark.parametrize("size_name", sorted(SIZES))
@pytest.mark.parametrize("shape", sorted(ANALYTIC_AREA))
def test_lone_object_area_matches_analytic_area_at_224(shape, size_name):
    obj = ShapeObject(shape, "red", size_name, 0.5, 0.5)
    image, instances = render(Scene("plain", (obj,)), 224)
    r = SIZES[size_name] * 224
    area = int((instances == 1).sum())
    assert area == pytest.approx(ANALYTIC_AREA[shape] * r * r, rel=0.05)
    assert area == int(object_mask(obj, 224).sum())
    assert colour_pixels(image, "red").sum() == area


@pytest.mark.parametrize("shape", ["circle", "square", "cross", "star"])
def test_symmetric_shapes_are_centred_on_their_centre(shape):
    obj = ShapeObject(shape, "blue", "large", 0.4, 0.6)
    x, y = centroid(object_mask(obj, 224))
    assert x + 0.5 == pytest.approx(0.4 * 224, abs=0.5)
    assert y + 0.5 == pytest.approx(0.6 * 224, abs=0.5)


def test_triangle_is_equilateral_not_truncated():
    mask = object_mask(ShapeObject("triangle", "red", "large", 0.5, 0.5), 224)
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert height / width == pytest.approx(math.sqrt(3) / 2, rel=0.05)


def test_triangle_mass_is_centred():
    obj = ShapeObject("triangle", "red", "large", 0.5, 0.5)
    r = obj.radius * 224
    x, y = centroid(object_mask(obj, 224))
    assert abs(x + 0.5 - 112) < 0.05 * r
    assert abs(y + 0.5 - 112) < 0.05 * r


def test_render_without_rng_uses_fixed_crop_and_rng_moves_it():
    scene = Scene("sand", (ShapeObject("circle", "green", "small", 0.3, 0.3),))
    a, ma = render(scene, S)
    b, mb = render(scene, S)
    assert a.tobytes() == b.tobytes() and np.array_equal(ma, mb)
    c, mc = render(scene, S, np.random.default_rng(123))
    assert np.array_equal(ma, mc)  # masks never depend on the crop
    assert a.tobytes() != c.tobytes()  # sand is a speckle texture: the crop shows
    assert (a[ma == 1] == c[mc == 1]).all()


def test_unknown_shape_raises():
    with pytest.raises(ValueError, match="hexagon"):
        object_mask(ShapeObject("hexagon", "red", "small", 0.5, 0.5), S)


# ----------------------------------------------------------------------------- 3. captions


def test_caption_names_every_object_count_and_background(scenes64):
    seen_counts = Counter()
    for s in scenes64:
        groups = groups_of(s.scene)
        for variant in (0, 1):
            text = caption(s.scene, variant)
            assert BACKGROUND_PHRASES[s.scene.background] in text
            for (colour, shape), count in groups.items():
                assert re.search(group_regex(colour, shape, count), text), (text, s.scene)
                seen_counts[count] += 1
            # no phantom objects: exactly one colour word per (colour, shape) group
            colour_words = [w for w in re.findall(r"[a-z]+", text) if w in COLOURS]
            assert len(colour_words) == len(groups), text
        assert s.captions == [caption(s.scene, 0), caption(s.scene, 1)]
    assert seen_counts[1] > 0 and seen_counts[2] > 0  # both singular and "two ..." were exercised


def test_caption_count_words_article_and_plurals():
    three = Scene("water", tuple(ShapeObject("cross", "red", "small", x, 0.5) for x in (0.2, 0.5, 0.8)))
    assert caption(three) == "three small red crosses on water"
    mixed = Scene(
        "land",
        (
            ShapeObject("circle", "orange", "small", 0.2, 0.2),
            ShapeObject("star", "blue", "large", 0.8, 0.8),
            ShapeObject("circle", "orange", "large", 0.2, 0.8),
        ),
    )
    text = caption(mixed)
    assert "two orange circles" in text  # mixed sizes: no size word
    assert "a large blue star" in text
    assert text.endswith("on land")
    lone = Scene("sky", (ShapeObject("circle", "orange", "large", 0.2, 0.2),))
    assert caption(lone) == "a large orange circle in the top left in the sky"
    assert caption(lone, 1) == "a large orange circle in the sky, in the top left"
    centre = Scene("plain", (ShapeObject("heart", "red", "small", 0.5, 0.55),))
    assert caption(centre) == "a small red heart in the center on a plain background"
    assert article("a orange circle") == "an orange circle"
    assert article("a red circle") == "a red circle"
    assert article("two orange circles") == "two orange circles"
    assert caption(Scene("sand", ())) == "an empty scene on sand"


def test_two_object_relation_matches_mask_centroids(scenes64):
    checked = 0
    for s in scenes64:
        objs = s.scene.objects
        if len(objs) != 2 or objs[0].noun == objs[1].noun:
            continue
        masks = s.object_masks()
        r0, r1 = (next(r for r in RELATIONS if f" {r} " in caption(s.scene, v)) for v in (0, 1))
        assert r1 == INVERSE[r0]  # the paraphrase swaps the objects and inverts the relation
        for variant in (0, 1):
            text = caption(s.scene, variant)
            rels = [r for r in RELATIONS if f" {r} " in text]
            assert len(rels) == 1, text
            left = text.split(f" {rels[0]} ")[0]
            first = [k for k, o in enumerate(objs) if f"{o.noun}" in left]
            assert len(first) == 1, text
            a, b = first[0], 1 - first[0]
            rel, margin = centroid_relation(masks[a], masks[b])
            if margin < 0.08 * S:  # near-diagonal: shape centroids may tip the dominant axis
                continue
            assert rels[0] == rel, (text, s.scene)
            checked += 1
    assert checked >= 60


def test_three_group_captions_list_objects_left_to_right(scenes64):
    checked = 0
    for s in scenes64:
        objs = s.scene.objects
        if len(objs) != 3 or len({o.noun for o in objs}) != 3:
            continue
        xs = [centroid(m)[0] for m in s.object_masks()]
        if min(abs(xs[i] - xs[j]) for i in range(3) for j in range(i)) < 1.0:
            continue
        by_x = [objs[k].noun for k in np.argsort(xs)]
        v0, v1 = caption(s.scene, 0), caption(s.scene, 1)
        assert "from left to right" in v0 and "from right to left" in v1
        assert sorted(by_x, key=v0.index) == by_x, v0
        assert sorted(by_x, key=v1.index) == by_x[::-1], v1
        checked += 1
    assert checked >= 20


def _named(text: str) -> Counter:
    colours, shapes = "|".join(COLOURS), "|".join(list(SHAPES) + list(PLURALS.values()))
    return Counter(re.findall(rf"\b(a|an|two|three) (?:small |large )?({colours}) ({shapes})\b", text))


def test_paraphrase_differs_but_names_the_same_objects(scenes64):
    checked = 0
    for s in scenes64:
        groups = groups_of(s.scene)
        if len(groups) == 1 and len(s.scene.objects) > 1:
            continue  # see test_paraphrase_of_a_single_repeated_group_differs
        v0, v1 = caption(s.scene, 0), caption(s.scene, 1)
        assert v0 != v1
        assert _named(v0) == _named(v1) and sum(_named(v0).values()) == len(groups)
        checked += 1
    assert checked >= 350


def test_paraphrase_of_a_single_repeated_group_differs():
    s = generate(0, 141)
    assert len(groups_of(s.scene)) == 1 and len(s.scene.objects) == 2
    assert s.captions[0] != s.captions[1]


def test_scene_graph_dict_relations_match_centres():
    s = generate(0, 3)
    d = s.scene.to_dict()
    assert d["background"] == s.scene.background
    assert len(d["objects"]) == len(s.scene.objects)
    n = len(s.scene.objects)
    assert len(d["relations"]) == n * (n - 1)
    for i, rel, j in d["relations"]:
        assert [j, INVERSE[rel], i] in d["relations"]


# ----------------------------------------------------------------------------- 4. resolution


def test_render_at_224_and_masks_agree_with_64():
    for i in range(60):
        small, big = generate(2, i, size=64), generate(2, i, size=224)
        assert small.scene == big.scene and small.captions == big.captions
        assert big.image.shape == (224, 224, 3) and big.instances.shape == (224, 224)
        for k, obj in enumerate(big.scene.objects):
            m224, m64 = big.instances == k + 1, small.instances == k + 1
            assert (big.image[m224] == COLOURS[obj.colour]).all()
            assert iou(downsample_nearest(m224, 64), m64) > 0.8, (i, obj)
            # the area scales with the pixel count
            assert m224.sum() / m64.sum() == pytest.approx((224 / 64) ** 2, rel=0.15)


def test_odd_resolution_renders():
    s = generate(0, 5, size=97)
    assert s.image.shape == (97, 97, 3)
    for k, obj in enumerate(s.scene.objects):
        assert (s.image[s.instances == k + 1] == COLOURS[obj.colour]).all()
        assert (s.instances == k + 1).sum() > 0


# ----------------------------------------------------------------------------- 5. datasets


def test_classification_labels_match_pixels():
    ds = ShapesClassification(120, seed=0, image_size=S)
    names = ShapesClassification.classes
    means = background_means()
    seen = {k: set() for k in names}
    for i in range(len(ds)):
        item = ds[i]
        image, mask = to_uint8(item["image"]), item["mask"].numpy()
        assert mask.dtype == bool and mask.sum() > 0
        colour = names["colour"][item["colour"]]
        assert (image[mask] == COLOURS[colour]).all()
        assert colour_pixels(image, colour).sum() == mask.sum()
        obj = ds.sample(i).scene.objects[0]
        labelled = ShapeObject(names["shape"][item["shape"]], colour, names["size"][item["size"]], obj.cx, obj.cy)
        assert np.array_equal(object_mask(labelled, S), mask)
        assert nearest_background(image, mask, means) == names["background"][item["background"]]
        assert item["caption"].startswith(("a ", "an ")) and colour in item["caption"]
        for k in names:
            seen[k].add(item[k])
    assert all(seen[k] == set(range(len(names[k]))) for k in names)


def test_spurious_perfect_correlation_labels_and_places_match_pixels():
    ds = SpuriousShapes(300, seed=0, correlation=1.0)
    means = background_means()
    labels = []
    for i in range(len(ds)):
        item = ds[i]
        image, mask = to_uint8(item["image"]), item["mask"].numpy()
        assert item["label"] == item["place"]
        assert nearest_background(image, mask, means) == ds.places[item["place"]]
        fill = bbox_fill(mask)
        # square fills its bounding box, circle about pi/4 of it
        if ds.classes[item["label"]] == "square":
            assert fill > 0.95
        else:
            assert 0.7 < fill < 0.85
        labels.append(item["label"])
    assert 0.4 < np.mean(labels) < 0.6


@pytest.fixture(scope="module")
def spurious_labels():
    """(label, place) of 2000 in-distribution SpuriousShapes samples, correlation 0.95."""
    ds = SpuriousShapes(2000, seed=0, correlation=0.95)
    items = [ds[i] for i in range(len(ds))]
    return np.array([it["label"] for it in items]), np.array([it["place"] for it in items])


def test_spurious_agreement_rate_equals_correlation(spurious_labels):
    labels, places = spurious_labels
    assert np.mean(labels == places) == pytest.approx(0.95, abs=0.02)


def test_spurious_agreement_rate_is_high_but_imperfect(spurious_labels):
    labels, places = spurious_labels
    agree = np.mean(labels == places)
    assert 0.93 <= agree < 1.0
    assert set(labels.tolist()) == {0, 1} and set(places.tolist()) == {0, 1}
    assert 0.45 < labels.mean() < 0.55


def test_spurious_ood_background_is_empty():
    ds = SpuriousShapes(100, seed=0, ood="background")
    means = background_means()
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] == -1
        assert item["mask"].sum() == 0
        image = to_uint8(item["image"])
        assert colours_present(image, min_pixels=1) == set()
        assert nearest_background(image, item["mask"].numpy(), means) == ds.places[item["place"]]


def test_spurious_ood_novel_shape_never_uses_id_classes(monkeypatch):
    drawn = []
    original = shapes_datasets.sample_object

    def spy(*args, **kwargs):
        obj = original(*args, **kwargs)
        drawn.append(obj)
        return obj

    monkeypatch.setattr(shapes_datasets, "sample_object", spy)
    ds = SpuriousShapes(150, seed=0, ood="novel_shape")
    for i in range(len(ds)):
        item = ds[i]
        obj = drawn[-1]
        assert item["label"] == -1
        assert obj.shape not in ds.classes
        assert np.array_equal(item["mask"].numpy(), object_mask(obj, S))
        assert bbox_fill(item["mask"].numpy()) < 0.9  # never a square
    assert {o.shape for o in drawn} == set(SHAPES) - {"square", "circle"}


def test_spurious_bad_inputs():
    with pytest.raises(ValueError, match="hexagon"):
        SpuriousShapes(10, classes=("square", "hexagon"))
    with pytest.raises(ValueError):
        SpuriousShapes(10, classes=("square", "circle", "star"), places=("land", "water"))
    with pytest.raises(ValueError, match="bogus"):
        SpuriousShapes(10, ood="bogus")


ATTRIBUTES = ("shape", "colour", "size", "cx", "cy")
POSITION_WORDS = (
    "in the top left",
    "in the top right",
    "in the bottom left",
    "in the bottom right",
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the center",
)


def cell(obj: ShapeObject) -> str:
    """The 3 x 3 cell of an object, written out here (not `position_phrase`)."""
    col = "left" if obj.cx < 0.4 else "right" if obj.cx > 0.6 else ""
    row = "top" if obj.cy < 0.4 else "bottom" if obj.cy > 0.6 else ""
    return {
        ("top", "left"): "in the top left",
        ("top", "right"): "in the top right",
        ("bottom", "left"): "in the bottom left",
        ("bottom", "right"): "in the bottom right",
        ("", "left"): "on the left",
        ("", "right"): "on the right",
        ("top", ""): "at the top",
        ("bottom", ""): "at the bottom",
    }.get((row, col), "in the center")


def test_cir_variants_differ_from_the_reference_in_exactly_the_named_attribute():
    ds = ShapesCIR(6 * 60, seed=0, image_size=S)
    for r in range(ds.n_sets):
        cir_set = ds.reference_set(r)
        ref, i = cir_set.reference, cir_set.edited
        assert len({o.noun for o in ref.objects}) == len(ref.objects) <= 2
        for kind, tgt, text in zip(CIR_KINDS, cir_set.variants, cir_set.captions):
            o = ref.objects[i]
            if kind == "background":
                assert tgt.objects == ref.objects and tgt.background != ref.background
                assert (
                    text == f"is {BACKGROUND_PHRASES[tgt.background]} instead of {BACKGROUND_PHRASES[ref.background]}"
                )
                continue
            assert tgt.background == ref.background
            if kind == "count":  # a copy of the object added elsewhere, nothing else touched
                assert tgt.objects[:-1] == ref.objects and len(tgt.objects) == len(ref.objects) + 1
                copy = tgt.objects[-1]
                assert (copy.shape, copy.colour, copy.size) == (o.shape, o.colour, o.size)
                assert text == f"has two {o.colour} {PLURALS[o.shape]} instead of one"
                continue
            assert len(tgt.objects) == len(ref.objects)
            assert all(a == b for j, (a, b) in enumerate(zip(ref.objects, tgt.objects)) if j != i)
            new = tgt.objects[i]
            changed = {f for f in ATTRIBUTES if getattr(o, f) != getattr(new, f)}
            if kind == "position":
                assert changed <= {"cx", "cy"} and changed and cell(new) != cell(o)
                assert text == f"has the {o.colour} {o.shape} {cell(new)} instead of {cell(o)}"
            else:
                assert changed == {kind}
                expected = {
                    "colour": f"has {article(f'a {new.colour} {o.shape}')} instead of {article(f'a {o.colour} one')}",
                    "shape": f"has {article(f'a {o.colour} {new.shape}')} "
                    f"instead of {article(f'a {o.colour} {o.shape}')}",
                    "size": f"has a {new.size} {o.colour} {o.shape} instead of a {o.size} one",
                }[kind]
                assert text == expected
            for a, b in itertools.combinations(tgt.objects, 2):  # nothing overlaps after the edit
                assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.extent + b.extent


def describe_by_hand(scene: Scene) -> Counter:
    return Counter((o.shape, o.colour, o.size, cell(o)) for o in scene.objects) + Counter({scene.background: 1})


def test_cir_target_is_the_only_member_of_its_set_the_caption_describes():
    ds = ShapesCIR(6 * 60, seed=1, image_size=S)
    for r in range(ds.n_sets):
        cir_set = ds.reference_set(r)
        for k, edit in enumerate(cir_set.edits):
            # what the caption asks for, built by hand from the reference's words and the edit
            want = describe_by_hand(cir_set.reference)
            o = cir_set.reference.objects[cir_set.edited]
            old = (o.shape, o.colour, o.size, cell(o))
            if edit.kind == "background":
                want = want - Counter({cir_set.reference.background: 1}) + Counter({edit.new: 1})
            elif edit.kind == "count":  # one more such object, anywhere: its cell is the target's
                copy = cir_set.variants[k].objects[-1]
                want[(o.shape, o.colour, o.size, cell(copy))] += 1
            else:
                changed = dict(zip(("shape", "colour", "size", "position"), old))
                changed[edit.kind] = edit.new
                want = want - Counter({old: 1}) + Counter({tuple(changed.values()): 1})
            members = cir_set.scenes()
            matches = [j for j, scene in enumerate(members) if describe_by_hand(scene) == want]
            assert matches == [1 + k], (r, edit.kind)
            assert [j for j, scene in enumerate(members) if satisfies_edit(cir_set.reference, edit, scene)] == [1 + k]


def test_cir_queries_cover_every_kind_of_each_set_and_render_the_set_once():
    ds = ShapesCIR(6 * 4, seed=2, image_size=S)
    assert ds.n_sets == 4
    for r in range(4):
        items = [ds[6 * r + k] for k in range(6)]
        assert [it["kind"] for it in items] == list(CIR_KINDS)
        assert all(torch.equal(items[0]["reference"], it["reference"]) for it in items)  # one reference image
        cir_set = ds.reference_set(r)
        for it, scene in zip(items, cir_set.variants):
            img = to_uint8(it["target"])
            assert not np.array_equal(img, to_uint8(it["reference"]))
            for obj in scene.objects:  # each target shows its scene
                assert (img[object_mask(obj, S)] == COLOURS[obj.colour]).all()
    with pytest.raises(IndexError):
        ds[24]


def test_circo_queries_plant_ground_truths_and_near_misses():
    ds = ShapesCIRCO(40, seed=0, image_size=S)
    for q in range(len(ds)):
        cq = ds.query(q)
        ref = cq.reference
        assert (
            len(ref.objects) == 1
            and cq.loose.shape == ref.objects[0].shape
            and cq.loose.colour != ref.objects[0].colour
        )
        text = cq.loose.caption()
        assert text == f"shows a {cq.loose.size} {cq.loose.colour} one {BACKGROUND_PHRASES[cq.loose.background]}"
        wanted = (cq.loose.shape, cq.loose.colour, cq.loose.size)
        for scene in cq.planted:
            assert scene.background == cq.loose.background
            assert any((o.shape, o.colour, o.size) == wanted for o in scene.objects)
        for scene in cq.negatives:
            assert not (
                scene.background == cq.loose.background
                and any((o.shape, o.colour, o.size) == wanted for o in scene.objects)
            )
    item = ds[3]
    assert item["planted"].shape == (3, 3, S, S) and item["negatives"].shape == (2, 3, S, S)
    img = to_uint8(item["planted"][0])
    obj = next(o for o in ds.query(3).planted[0].objects if o.colour == ds.query(3).loose.colour)
    assert (img[object_mask(obj, S)] == COLOURS[obj.colour]).all()


def test_pretrain_relative_captions_name_the_difference_and_fit_the_context():
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    ds = ShapesPretrain(400, seed=0, twin_edits="all", relative_caption_p=1.0)
    for i in range(len(ds)):
        scene, twin, captions, _ = ds.pair(i)
        assert captions[0] != captions[1]
        for cap in captions:
            assert cap.startswith("a photo of ") and " that " in cap
            assert len(tok.encode(cap)) <= 30, cap  # start and end of text fit too: nothing is cut
        diff = describe_by_hand(scene) != describe_by_hand(twin)
        assert diff, i  # the twins differ in what words can say
    plain = ShapesPretrain(50, seed=0, twin_edits="all")
    assert all(" that " not in c or "a photo of" in c for i in range(50) for c in plain.pair(i)[2])
    with pytest.raises(ValueError, match="twin_edits='all'"):
        ShapesPretrain(5, relative_caption_p=0.5)


def test_faithfulness_errors_masks_and_renderings(monkeypatch):
    shown = []
    original = shapes_datasets.render

    def spy(scene, size=64, rng=None):
        out = original(scene, size, rng)
        shown.append((scene, out[0]))
        return out

    monkeypatch.setattr(shapes_datasets, "render", spy)
    ds = ShapesFaithfulness(60, seed=0, image_size=S, n_renderings=4)
    kinds = Counter()
    for i in range(len(ds)):
        start = len(shown)
        item = ds[i]
        renders = shown[start:]
        errors, masks, faithful = item["errors"], item["error_masks"].numpy(), item["faithful"]
        assert len(renders) == len(errors) == 4
        assert item["images"].shape == (4, 3, S, S) and masks.shape == (4, S, S)
        assert faithful.tolist() == [e == "none" for e in errors]
        assert faithful.any() and not faithful.all()
        truth = next(sc for (sc, _), e in zip(renders, errors) if e == "none")
        assert item["prompt"] == caption(truth)
        for k, ((scene, img), err) in enumerate(zip(renders, errors)):
            kinds[err] += 1
            assert err == "none" or err in FAITHFULNESS_ERRORS
            assert np.array_equal(to_uint8(item["images"][k]), img)
            assert (caption(scene) == item["prompt"]) == (err == "none")
            assert bool(masks[k].any()) == (err != "none")
            diff = set(truth.objects) ^ set(scene.objects)
            expected = np.zeros((S, S), bool)
            for obj in diff:
                expected |= object_mask(obj, S)
            assert np.array_equal(masks[k], expected), (i, k, err)
            if err == "count":
                assert len(scene.objects) == len(truth.objects) + 1
            elif err == "missing":
                assert len(scene.objects) == len(truth.objects) - 1
            elif err in ("colour", "position"):
                assert len(scene.objects) == len(truth.objects) and len(diff) == 2
    assert set(kinds) == {"none", *FAITHFULNESS_ERRORS}
    with pytest.raises(ValueError, match="n_renderings"):
        ShapesFaithfulness(5, n_renderings=1)


def test_pretrain_pairs_are_one_attribute_counterfactuals(monkeypatch):
    shown = []
    original = shapes_datasets.render

    def spy(scene, size=64, rng=None):
        out = original(scene, size, rng)
        shown.append((scene, out))
        return out

    monkeypatch.setattr(shapes_datasets, "render", spy)
    ds = ShapesPretrain(120, seed=0, image_size=S)
    changed_attrs = Counter()
    for i in range(len(ds)):
        item = ds[i]
        (scene, (img0, inst0)), (twin, (img1, inst1)) = shown[-2:]
        assert item["image"].shape == (2, 3, S, S)
        assert np.array_equal(to_uint8(item["image"][0]), img0)
        assert np.array_equal(to_uint8(item["image"][1]), img1)
        a, b = item["captions"]
        assert isinstance(a, str) and isinstance(b, str) and a != b
        assert scene.background == twin.background and len(scene.objects) == len(twin.objects)
        diffs = [(k, o, t) for k, (o, t) in enumerate(zip(scene.objects, twin.objects)) if o != t]
        assert len(diffs) == 1
        k, o, t = diffs[0]
        attrs = {f for f in ("shape", "colour", "size", "cx", "cy") if getattr(o, f) != getattr(t, f)}
        assert attrs in ({"shape"}, {"colour"})
        changed_attrs[next(iter(attrs))] += 1
        # the twin differs from the original on the changed object's pixels
        m0, m1 = inst0 == k + 1, inst1 == k + 1
        region = m0 if attrs == {"colour"} else m0 ^ m1
        assert region.sum() > 0
        assert (img0[region] != img1[region]).any(axis=-1).mean() > 0.95
        assert (img0[m0] == COLOURS[o.colour]).all() and (img1[m1] == COLOURS[t.colour]).all()
        for sc, text in ((scene, a), (twin, b)):  # every caption names every shape of its scene
            for obj in sc.objects:
                assert re.search(rf"\b({obj.shape}|{PLURALS[obj.shape]})\b", text), (text, sc)
    assert changed_attrs["shape"] > changed_attrs["colour"] > 0


def test_pretrain_twin_captions_share_style():
    ds = ShapesPretrain(400, seed=0, image_size=S)
    phrases = tuple(BACKGROUND_PHRASES.values())
    for i in range(len(ds)):
        a, b = ds[i]["captions"]
        assert any(p in a for p in phrases) == any(p in b for p in phrases), (i, a, b)
        assert any(c in a.split() for c in COLOURS) == any(c in b.split() for c in COLOURS), (i, a, b)


def test_multimodal_labels_in_range_and_consistent_with_pixels():
    ds = ShapesMultimodal(200, seed=0, image_size=S)
    areas: dict[tuple[int, int], list[int]] = {}
    types, severities = set(), set()
    for i in range(len(ds)):
        item = ds[i]
        assert 0 <= item["type"] < len(ShapesMultimodal.label_names["type"])
        assert 0 <= item["severity"] < len(ShapesMultimodal.label_names["severity"])
        text, image = item["text"], to_uint8(item["image"])
        colours = [c for c in COLOURS if re.search(rf"\b{c}\b", text)]
        assert len(colours) == 1, text
        assert colours_present(image) == set(colours)
        assert any(p in text for p in BACKGROUND_PHRASES.values())
        # the shape label is not leaked into the text
        assert not any(re.search(rf"\b{s}\b", text) for s in SHAPES)
        areas.setdefault((item["type"], item["severity"]), []).append(int(colour_pixels(image, colours[0]).sum()))
        types.add(item["type"])
        severities.add(item["severity"])
    assert types == set(range(len(SHAPES))) and severities == {0, 1}
    small, large = tuple(SIZES).index("small"), tuple(SIZES).index("large")
    for t in range(len(SHAPES)):
        if (t, small) in areas and (t, large) in areas:
            assert max(areas[(t, small)]) < min(areas[(t, large)])


@pytest.mark.parametrize("cls", [ShapesCaptions, ShapesPretrain, SpuriousShapes, ShapesFaithfulness])
def test_datasets_default_image_size(cls):
    ds = cls(3, 0)
    first = next(v for k, v in ds[0].items() if k in ("image", "images"))
    assert first.shape[-2:] == (64, 64)


@pytest.mark.parametrize("cls", [ShapesClassification, ShapesCIR, ShapesMultimodal])
def test_datasets_default_image_size_inherited(cls):
    ds = cls(3, 0)
    assert ds.image_size == 64
    item = ds[0]
    images = [v for k, v in item.items() if k in ("image", "reference", "target")]
    assert images and all(img.shape == (3, 64, 64) for img in images)


@pytest.mark.parametrize("name", sorted(DATASET_CLASSES))
def test_datasets_reject_zero_length(name):
    with pytest.raises(ValueError, match="n=0"):
        DATASET_CLASSES[name](0, 0, S)


# ----------------------------------------------------------------------------- 6. DataModule


def test_datamodule_val_loaders_are_tagged_per_task():
    tasks = ["retrieval", "classification", "spurious"]
    dm = ShapesWorldDataModule(val_tasks=tasks, n_val=6, batch_size=4)
    loaders = dm.val_dataloader()
    assert len(loaders) == len(tasks)
    for task, loader in zip(tasks, loaders):
        batches = list(loader)
        assert [len(b["index"]) for b in batches] == [4, 2]  # no drop_last for held-out sets
        for b in batches:
            assert b["task"] == task
        b = batches[0]
        if task == "retrieval":
            assert b["image"].shape == (4, 3, S, S) and len(b["texts"]) == 8
        elif task == "classification":
            assert b["shape"].shape == (4,) and b["mask"].shape == (4, S, S)
        else:
            assert b["label"].tolist() == [x for x in b["label"].tolist() if x in (0, 1)]
    assert [b["task"] for b in (next(iter(loader)) for loader in dm.test_dataloader())] == tasks


def test_datamodule_retrieval_text_to_image_points_at_the_right_image():
    dm = ShapesWorldDataModule(val_tasks=["retrieval"], n_val=12, batch_size=6, seed=4)
    ds = dm.dataset("retrieval")
    assert ds.seed == 1004  # held-out sets use seed + 1000
    (loader,) = dm.val_dataloader()
    n = 0
    for batch in loader:
        t2i = batch["text_to_image"]
        assert t2i.dtype == torch.long and len(t2i) == len(batch["texts"]) == 2 * len(batch["image"])
        for text, owner in zip(batch["texts"], t2i.tolist()):
            image = to_uint8(batch["image"][owner])
            named = {c for c in COLOURS if re.search(rf"\b{c}\b", text)}
            assert named == colours_present(image, min_pixels=1), text
            index = int(batch["index"][owner])
            sample = ds.sample(index)
            assert text in sample.captions
            assert np.array_equal(image, sample.image)
            n += 1
    assert n == 24


def test_datamodule_pretrain_train_loader_flattens_pairs():
    dm = ShapesWorldDataModule(val_tasks=[], train_task="pretrain", n_train=16, batch_size=8, seed=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4  # 16 items, 4 pairs per batch
    for b in batches:
        assert b["task"] == "pretrain"
        assert b["image"].shape == (8, 3, S, S) and len(b["texts"]) == 8
        assert all(b["texts"][2 * k] != b["texts"][2 * k + 1] for k in range(4))
    assert dm.dataset("pretrain", "train").seed == 0


def test_datamodule_task_options_reach_the_dataset():
    dm = ShapesWorldDataModule(
        val_tasks=["spurious"], n_val=5, batch_size=5, task_options={"spurious": {"ood": "background"}}
    )
    (batch,) = list(dm.val_dataloader()[0])
    assert batch["label"].tolist() == [-1] * 5 and batch["mask"].sum() == 0


def test_datamodule_bad_inputs():
    with pytest.raises(ValueError, match="'bogus'"):
        ShapesWorldDataModule(val_tasks=["retrieval", "bogus"])
    with pytest.raises(ValueError, match="'nope'"):
        ShapesWorldDataModule(train_task="nope")
    with pytest.raises(ValueError, match="train_task"):
        ShapesWorldDataModule().train_dataloader()
    with pytest.raises(ValueError, match="n=0"):
        ShapesWorldDataModule(val_tasks=["retrieval"], n_val=0).val_dataloader()
    assert set(TASKS) == {"retrieval", "classification", "spurious", "pretrain"}
    # one batch schema per task tag: these workflows batch ShapesWorld in their own datamodule
    for task, datamodule in (
        ("cir", "CIRDataModule"),
        ("faithfulness", "TiPAIDataModule"),
        ("multimodal", "DistillDataModule"),
    ):
        with pytest.raises(ValueError, match=rf"{task!r} has a batch schema of its own: use xclip\.\w+\.{datamodule}"):
            ShapesWorldDataModule(val_tasks=[task])
