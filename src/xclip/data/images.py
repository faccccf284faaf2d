"""Reading image files: one function for every loader, so every workflow decodes a file the same way.

`read_rgb(path)` returns an 8-bit RGB PIL image, whatever the file holds:

- EXIF orientation is applied (a phone photo stored sideways comes out upright);
- 16-bit greyscale (``I;16*``) and 32-bit integer (``I``) images are scaled from 0..65535 to
  0..255 (Pillow decodes 16-bit PNG/TIFF greyscale into these modes; ``convert("RGB")`` would
  clip them to white);
- 32-bit float (``F``) images must hold values in [0, 1] and are scaled to 0..255; any other range
  is refused (its meaning is unknown: 0-1 or 0-255?);
- transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent index) is composited
  on `BACKGROUND` (white), so transparent pixels never show the arbitrary colour stored under them;
- CMYK, YCbCr, LAB, HSV, bilevel and palette images are converted with Pillow's conversion.

A file that declares more than `MAX_PIXELS` pixels is refused before it is decoded (a few hundred
bytes of PNG can declare 30000 x 30000 pixels and take gigabytes to decode: a "decompression bomb").
A file that cannot be opened or decoded raises :class:`ImageReadError` naming the file;
`load_image01` turns it into ``None`` (logged) so datasets can count and report skipped files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import functional as TF

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
MAX_PIXELS = 64_000_000  # width x height; larger files are skipped as unreadable (8000 x 8000 passes)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageReadError(OSError):
    """An image file that cannot be read or decoded into RGB; ``str()`` names the file."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def _scaled_to_uint8(img: Image.Image, path: Path) -> Image.Image:
    """A single-channel 16-bit, 32-bit integer or float image as 8-bit ``L``."""
    values = np.asarray(img)
    if img.mode == "F":
        finite = np.isfinite(values)
        if not finite.all():
            raise ImageReadError(path, "float image holds NaN or infinite values")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageReadError(
                path,
                f"float image values span [{lo:g}, {hi:g}]; xclip reads float images "
                "as [0, 1]: save it as 8- or 16-bit, or rescale it to [0, 1]",
            )
        scaled = values * 255.0
    else:  # I;16, I;16B, I;16L, I;16N, I: 16-bit data
        scaled = values.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB by the rules in the module docstring."""
    path = Path(path)
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _scaled_to_uint8(img, path)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if img.mode == "L" and "transparency" in img.info:
        return to_rgb(img.convert("LA"), path)
    if img.mode == "RGB" and "transparency" in img.info:
        return to_rgb(img.convert("RGBA"), path)
    return img.convert("RGB")


def _too_many_pixels(declared: str) -> str:
    return (
        f"declares {declared} pixels, over xclip's limit of {MAX_PIXELS:,} (xclip.data.images.MAX_PIXELS): "
        "a damaged or hostile file; downscale it if the image is real"
    )


def read_rgb(path: str | Path) -> Image.Image:
    """Open and decode `path` into an 8-bit RGB image (see the module docstring).

    Raises:
        ImageReadError: the file is missing, truncated, not an image, or holds values that cannot
            be mapped to RGB unambiguously.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageReadError(path, _too_many_pixels(f"{img.width} x {img.height}"))
            img.load()
            return to_rgb(img, path)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:  # Pillow refuses the largest ones while opening
        raise ImageReadError(path, _too_many_pixels("more than twice Pillow's own limit of")) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ImageReadError(path, f"cannot read the image ({err})") from None


def resize_center_crop(img: Image.Image, image_size: int) -> Tensor:
    """[3, S, S] float in [0, 1]: bicubic resize of the shorter side to S, centre crop."""
    img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.to_tensor(TF.center_crop(img, image_size))


def load_image01(path: str | Path, image_size: int) -> Tensor | None:
    """[3, S, S] float in [0, 1] (`read_rgb`, then `resize_center_crop`), or None when the file
    cannot be read (logged with its path; datasets count and report it)."""
    try:
        img = read_rgb(path)
    except ImageReadError as err:
        log.warning("skipping unreadable image: %s", err)
        return None
    return resize_center_crop(img, image_size)
