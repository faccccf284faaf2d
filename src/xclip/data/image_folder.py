"""Any folder of images (PlacesBG-style OOD sets), decoded by `xclip.data.images` (the one reading
rule of every loader: RGB, shorter side resized to `image_size`, centre crop, floats in [0, 1]).

An unreadable or corrupt image becomes an `unreadable_item` (its index and path, no image);
:func:`collate_skipping` drops such items from the batch and reports them in ``batch["skipped"]``
(count), ``batch["skipped_index"]`` and ``batch["skipped_paths"]``, so one bad file is reported
with its path, not fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from xclip.data.images import IMAGE_EXTENSIONS, load_image01


def unreadable_item(index: int, path: str | Path) -> dict[str, Any]:
    """What a dataset returns for an image file it cannot decode."""
    return {"unreadable": True, "index": int(index), "path": str(path)}


def collate_skipping(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Default-collate the readable items. ``skipped`` = how many were unreadable, with their
    ``skipped_index`` [S] (dataset indices) and ``skipped_paths`` [S]. With no readable item the
    batch holds only these three."""
    bad = [it for it in items if it.get("unreadable")]
    kept = [it for it in items if not it.get("unreadable")]
    batch = default_collate(kept) if kept else {}
    batch["skipped"] = len(bad)
    batch["skipped_index"] = torch.tensor([it["index"] for it in bad], dtype=torch.long)
    batch["skipped_paths"] = [it["path"] for it in bad]
    return batch


class ImageFolder(Dataset):
    """Every image file under `root` (recursive, by extension, sorted by relative path).

    Item: ``{"image": [3, S, S], "label": -1, "index": int, "path": str}``, or an `unreadable_item`.
    """

    def __init__(self, root: str | Path, image_size: int = 224):
        self.root, self.image_size = Path(root), int(image_size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root}: no such directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"image folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = load_image01(self.files[index], self.image_size)
        if image is None:
            return unreadable_item(index, self.files[index].relative_to(self.root))
        return {"image": image, "label": -1, "index": index, "path": str(self.files[index].relative_to(self.root))}
