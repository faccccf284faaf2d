"""On-disk fixtures in the real formats, written from ShapesWorld images: a WaterBirds folder
(``metadata.csv`` + ``001.Black_footed_Albatross/...jpg``) and a PlacesBG-style image folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from xclip.data.shapes import SpuriousShapes

WATERBIRDS_FOLDERS = ("001.Black_footed_Albatross", "045.Northern_Fulmar", "094.White_breasted_Nuthatch")
SPLITS_PER_IMAGE = (0, 1, 2, 2, 1, 2, 0, 2, 2, 1, 2, 2)  # 2 train, 3 val, 7 test


def _jpeg(image01, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image01.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path, format="JPEG", quality=95)


def write_waterbirds(root: Path, corrupt_test_image: bool = True) -> Path:
    """12 ShapesWorld images (label = square 0 / circle 1) in WaterBirds' layout; with
    `corrupt_test_image` the last test image is a file of garbage bytes."""
    ds = SpuriousShapes(n=len(SPLITS_PER_IMAGE), seed=11, image_size=64)
    rows = []
    for i, split in enumerate(SPLITS_PER_IMAGE):
        item = ds[i]
        rel = f"{WATERBIRDS_FOLDERS[i % 3]}/{WATERBIRDS_FOLDERS[i % 3].split('.')[1]}_{i:04d}_{100 + i}.jpg"
        _jpeg(item["image"], root / rel)
        rows.append(
            {
                "img_id": i + 1,
                "img_filename": rel,
                "y": item["label"],
                "split": split,
                "place": item["place"],
                "place_filename": f"/x/xxx/place_{i}.jpg",
            }
        )
    if corrupt_test_image:
        (root / rows[-1]["img_filename"]).write_bytes(b"not a jpeg at all")
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_placesbg(root: Path, n: int = 6) -> Path:
    """Background-only ShapesWorld images as ``{land,water}/*.jpg`` plus a PNG one level deeper
    and a non-image file that must be ignored."""
    ds = SpuriousShapes(n=n, seed=12, image_size=64, ood="background")
    for i in range(n):
        item = ds[i]
        place = ("land", "water")[item["place"]]
        _jpeg(item["image"], root / place / f"{place}_{i:03d}.jpg")
    extra = SpuriousShapes(n=1, seed=13, image_size=64, ood="background")[0]["image"].permute(1, 2, 0).numpy() * 255
    (root / "water" / "deep").mkdir(parents=True, exist_ok=True)
    Image.fromarray(extra.round().astype(np.uint8)).save(root / "water" / "deep" / "extra.PNG")
    (root / "README.txt").write_text("not an image")
    return root
