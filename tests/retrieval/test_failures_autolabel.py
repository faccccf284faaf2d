"""The ShapesWorld auto-labeller on hand-built scene pairs: one test per taxonomy branch."""

import pytest

from xclip.data.shapes.scene import Scene, ShapeObject, caption
from xclip.retrieval.failures.autolabel import autolabel, captions_true_of
from xclip.retrieval.gallery import ShapesGallery

RED_CIRCLE = ShapeObject("circle", "red", "large", 0.25, 0.5)
BLUE_SQUARE = ShapeObject("square", "blue", "small", 0.75, 0.5)
TWO = Scene("water", (RED_CIRCLE, BLUE_SQUARE))


def label(gt: Scene, retrieved: Scene, variant: int = 0) -> str:
    return autolabel(caption(gt, variant), gt, retrieved)


def test_every_gallery_caption_is_true_of_its_own_scene():
    g = ShapesGallery(n=40, seed=5)
    for i in range(len(g)):
        assert set(g.captions(i)) <= captions_true_of(g.scene(i))


def test_same_layout_in_another_drawing_order_is_a_near_duplicate():
    swapped = Scene("water", (BLUE_SQUARE, RED_CIRCLE))
    assert caption(swapped, 0) != caption(TWO, 0)  # the generator words groups in drawing order
    assert label(TWO, swapped) == "Ambiguous/nearduplicate"
    moved_a_little = Scene("water", (RED_CIRCLE, ShapeObject("square", "blue", "small", 0.78, 0.55)))
    assert label(TWO, moved_a_little) == "Ambiguous/nearduplicate"  # same 3x3 cells


def test_caption_true_of_a_different_layout_is_underspecified():
    # both objects move to the top row: "to the left of" still holds, absolute positions differ
    up = Scene(
        "water", (ShapeObject("circle", "red", "large", 0.25, 0.2), ShapeObject("square", "blue", "small", 0.75, 0.2))
    )
    assert caption(up, 0) == caption(TWO, 0)
    assert label(TWO, up) == "Ambiguous/underspecified"


@pytest.mark.parametrize(
    "retrieved, expected",
    [
        (Scene("water", (RED_CIRCLE, ShapeObject("star", "blue", "small", 0.75, 0.5))), "Object"),  # other shape
        (Scene("water", (RED_CIRCLE,)), "Object"),  # missing object
        (Scene("water", (RED_CIRCLE, BLUE_SQUARE, ShapeObject("square", "blue", "small", 0.75, 0.15))), "Count"),
        (Scene("water", (RED_CIRCLE, ShapeObject("square", "green", "small", 0.75, 0.5))), "Attribute"),  # colour
        (Scene("water", (RED_CIRCLE, ShapeObject("square", "blue", "large", 0.75, 0.5))), "Attribute"),  # size
        (Scene("sand", (RED_CIRCLE, BLUE_SQUARE)), "Context"),  # background only
        (
            Scene(
                "water",
                (ShapeObject("circle", "red", "large", 0.75, 0.5), ShapeObject("square", "blue", "small", 0.25, 0.5)),
            ),
            "Spatial",
        ),  # swapped sides
    ],
)
def test_first_scene_graph_difference_decides(retrieved, expected):
    assert label(TWO, retrieved) == expected
    assert label(TWO, retrieved, variant=1) == expected  # the paraphrase gets the same label


def test_priority_object_before_attribute_before_context():
    other_shape_colour_bg = Scene("sky", (RED_CIRCLE, ShapeObject("heart", "green", "small", 0.75, 0.5)))
    assert label(TWO, other_shape_colour_bg) == "Object"
    colour_and_bg = Scene("sky", (RED_CIRCLE, ShapeObject("square", "green", "small", 0.75, 0.5)))
    assert label(TWO, colour_and_bg) == "Attribute"


def test_single_object_in_another_cell_is_spatial():
    gt = Scene("land", (ShapeObject("star", "yellow", "large", 0.2, 0.2),))
    there = Scene("land", (ShapeObject("star", "yellow", "large", 0.8, 0.2),))
    assert caption(gt) == "a large yellow star in the top left on land"
    assert label(gt, there) == "Spatial"
