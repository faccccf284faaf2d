"""Fixtures in real on-disk dataset formats, written from ShapesWorld samples: a COCO captions
folder (``annotations/captions_val2017.json`` + ``val2017/*.jpg``)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from xclip.data.shapes import generate

IDS = [397, 42, 139, 785, 1000, 632]  # unsorted on purpose; the gallery orders by id


def write_image(path: Path, index: int, size=(80, 64)) -> None:
    """ShapesWorld sample `index` as a non-square JPEG (so resize + centre crop matter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(generate(seed=9, index=index, size=64).image).resize(size, Image.BICUBIC).save(path, quality=95)


def write_coco(root: Path) -> Path:
    """COCO's captions layout with the images of `IDS` and two captions each (padded with spaces,
    interleaved across images, as real annotation files are not grouped by image)."""
    images, annotations = [], []
    for k, image_id in enumerate(IDS):
        name = f"{image_id:012d}.jpg"
        write_image(root / "val2017" / name, k)
        images.append({"id": image_id, "file_name": name, "height": 64, "width": 80})
        for v, text in enumerate(generate(seed=9, index=k, size=64).captions):
            annotations.append({"id": 10 * image_id + v, "image_id": image_id, "caption": f" {text} "})
    annotations = annotations[1::2] + annotations[0::2]  # captions of one image are not contiguous
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root
