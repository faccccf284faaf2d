"""ShapesWorld: a deterministic procedural world of coloured shapes with masks, scene graphs
and captions, for every xclip workflow (see ``generate`` and the datasets)."""

from xclip.data.shapes.datamodule import TASKS, ShapesWorldDataModule
from xclip.data.shapes.datasets import (
    CIR_KINDS,
    FAITHFULNESS_ERRORS,
    ShapesCaptions,
    ShapesCIR,
    ShapesCIRCO,
    ShapesClassification,
    ShapesFaithfulness,
    ShapesMultimodal,
    ShapesNotes,
    ShapesPretrain,
    SpuriousShapes,
)
from xclip.data.shapes.edits import (
    EDIT_KINDS,
    apply_edit,
    describe,
    relative_caption,
    satisfies_edit,
)
from xclip.data.shapes.generator import (
    ShapesSample,
    draw,
    generate,
    image_tensor,
    sample_rng,
)
from xclip.data.shapes.render import object_mask, render
from xclip.data.shapes.scene import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CIR_KINDS",
    "COLOURS",
    "EDIT_KINDS",
    "FAITHFULNESS_ERRORS",
    "SHAPES",
    "SIZES",
    "TASKS",
    "Scene",
    "ShapeObject",
    "ShapesCIR",
    "ShapesCIRCO",
    "ShapesCaptions",
    "ShapesClassification",
    "ShapesFaithfulness",
    "ShapesMultimodal",
    "ShapesNotes",
    "ShapesPretrain",
    "ShapesSample",
    "ShapesWorldDataModule",
    "SpuriousShapes",
    "apply_edit",
    "caption",
    "describe",
    "draw",
    "generate",
    "image_tensor",
    "object_mask",
    "relative_caption",
    "render",
    "sample_rng",
    "sample_scene",
    "satisfies_edit",
]
