"""Images from disk for evaluation: any folder of images (PlacesBG-style OOD sets) and the
shared loading rule (RGB, shorter side resized to `image_size`, centre crop, floats in [0, 1]).

An unreadable or corrupt image becomes ``None``; :func:`collate_skipping` drops such items from
the batch and counts them in ``batch["skipped"]``, so one bad file is reported, not fatal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import functional as TF

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image01(path: str | Path, image_size: int) -> Tensor | None:
    """[3, S, S] float in [0, 1] (bicubic resize of the shorter side, centre crop), or None when
    the file cannot be read or decoded (logged)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        log.warning("skipping unreadable image %s (%s)", path, err)
        return None
    img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.to_tensor(TF.center_crop(img, image_size))


def collate_skipping(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Default-collate the readable items; ``skipped`` = how many were None. With no readable
    item the batch holds only ``skipped``."""
    kept = [it for it in items if it is not None]
    batch = default_collate(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch


class ImageFolder(Dataset):
    """Every image file under `root` (recursive, by extension, sorted by relative path).

    Item: ``{"image": [3, S, S], "label": -1, "index": int, "path": str}``, or None if unreadable.
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
            return None
        return {"image": image, "label": -1, "index": index, "path": str(self.files[index].relative_to(self.root))}
