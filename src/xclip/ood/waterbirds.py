"""WaterBirds in its published on-disk format: ``metadata.csv`` plus the image folders.

``metadata.csv`` columns: ``img_id,img_filename,y,split,place,place_filename``; ``img_filename``
is relative to the root (``001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``);
``split`` 0/1/2 = train/val/test; ``y`` 1 = waterbird; ``place`` 1 = water background.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from xclip.data.image_folder import unreadable_item
from xclip.data.images import load_image01

COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
SPLITS = {"train": 0, "val": 1, "test": 2}
CLASS_NAMES = ("landbird", "waterbird")


def split_code(split: int | str) -> int:
    """``train``/``val``/``test`` or 0/1/2 -> 0/1/2."""
    code = SPLITS.get(split, -1) if isinstance(split, str) else split  # -1: an unknown name
    if code not in SPLITS.values():
        raise ValueError(f"WaterBirds split must be one of {sorted(SPLITS)} or 0/1/2, got {split!r}")
    return code


class WaterBirds(Dataset):
    """One split of WaterBirds. Item: ``{"image": [3, S, S] in [0, 1], "label": y, "place",
    "index": img_id, "path"}``, or an `unreadable_item` when the image cannot be read.

    Args:
        root: the directory holding ``metadata.csv`` and the class folders.
        split: ``train``/``val``/``test`` or 0/1/2.
        image_size: output side S (shorter side resized, centre crop).
    """

    class_names = CLASS_NAMES

    def __init__(self, root: str | Path, split: int | str = "test", image_size: int = 224):
        self.root, self.split, self.image_size = Path(root), split_code(split), int(image_size)
        meta = self.root / "metadata.csv"
        if not meta.is_file():
            raise FileNotFoundError(
                f"WaterBirds metadata {meta}: no such file (expected the dataset root with "
                "metadata.csv and the 001.Black_footed_Albatross/... folders)"
            )
        with meta.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{meta} lacks the column(s) {missing}; expected {','.join(COLUMNS)}")
            self.rows = [r for r in reader if int(r["split"]) == self.split]
        if not self.rows:
            raise ValueError(f"{meta} has no rows with split == {self.split}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.rows[index]
        image = load_image01(self.root / row["img_filename"], self.image_size)
        if image is None:
            return unreadable_item(int(row["img_id"]), row["img_filename"])
        return {
            "image": image,
            "label": int(row["y"]),
            "place": int(row["place"]),
            "index": int(row["img_id"]),
            "path": row["img_filename"],
        }
