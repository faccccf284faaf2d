"""Fixtures in real on-disk dataset formats, written from ShapesWorld samples: a COCO captions
folder (``annotations/captions_val2017.json`` + ``val2017/*.jpg``)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from PIL import Image

from xclip.data.shapes import generate

IDS = [397, 42, 139, 785, 1000, 632]  # unsorted on purpose; the gallery orders by id


def write_image(path: Path, index: int, size=(80, 64)) -> None:
    """ShapesWorld sample `index` as a non-square JPEG (so resize + centre crop matter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(generate(seed=9, index=index, size=64).image).resize(size, Image.BICUBIC).save(path, quality=95)


def write_bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A ~100-byte PNG that declares `width` x `height` RGB pixels (a "decompression bomb"): its
    header is valid, its data holds one row of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * 64)))
        + chunk(b"IEND", b"")
    )
    return path


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
        json.dumps({"info": {}, "images": images, "annotations": annotations})
    )
    return root
