"""ShapesWorld: a deterministic procedural world of coloured shapes with masks, scene graphs
and captions, for every xclip workflow (see ``generate`` and the datasets)."""

from xclip.data.shapes.datamodule import TASKS, ShapesWorldDataModule
from xclip.data.shapes.datasets import (
    CIR_KINDS,
    FAITHFULNESS_ERRORS,
    ShapesCaptions,
    ShapesCIR,
    ShapesClassification,
    ShapesFaithfulness,
    ShapesMultimodal,
    ShapesNotes,
    ShapesPretrain,
    SpuriousShapes,
)
from xclip.data.shapes.generator import ShapesSample, draw, generate, image_tensor, sample_rng
from xclip.data.shapes.render import object_mask, render
from xclip.data.shapes.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, ShapeObject, caption, sample_scene

__all__ = [
    "BACKGROUNDS", "CIR_KINDS", "COLOURS", "FAITHFULNESS_ERRORS", "SHAPES", "SIZES", "TASKS",
    "Scene", "ShapeObject", "ShapesCIR", "ShapesCaptions", "ShapesClassification", "ShapesFaithfulness",
    "ShapesMultimodal", "ShapesNotes", "ShapesPretrain", "ShapesSample", "ShapesWorldDataModule", "SpuriousShapes",
    "caption", "draw", "generate", "image_tensor", "object_mask", "render", "sample_rng", "sample_scene",
]
