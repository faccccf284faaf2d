"""Rasterise ShapesWorld scenes: RGB uint8 images and per-object pixel masks, at any size.

Speed matters (training draws fresh images every step), so backgrounds are crops of textures
made once per resolution and every shape is an implicit inequality evaluated on the object's
bounding box only.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from xclip.data.shapes.scene import COLOURS, Scene, ShapeObject

_BG_BASE = {
    "plain": (200, 200, 200),
    "water": (95, 140, 170),
    "land": (125, 140, 85),
    "sky": (165, 200, 232),
    "sand": (214, 192, 150),
}
_BG_SEED = {"plain": 1, "water": 2, "land": 3, "sky": 4, "sand": 5}


@lru_cache(maxsize=8)
def _texture(background: str, size: int) -> np.ndarray:
    """A [2*size, 2*size, 3] float32 texture, fixed for each (background, size)."""
    rng = np.random.default_rng(_BG_SEED[background])
    n = 2 * size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / size
    base = np.asarray(_BG_BASE[background], np.float32)
    if background == "plain":
        return np.broadcast_to(base, (n, n, 3)).copy()
    if background == "water":
        waves = np.sin(2 * np.pi * (yy * 7 + 0.15 * np.sin(2 * np.pi * xx * 3)))
        pattern = 16 * waves[..., None]
    elif background == "land":
        noise = rng.normal(0, 1, (n // 4 + 1, n // 4 + 1)).repeat(4, 0).repeat(4, 1)[:n, :n]
        pattern = np.stack([12 * noise, 14 * noise, 6 * noise], -1) + 8 * np.sin(2 * np.pi * yy * 2)[..., None]
    elif background == "sky":
        pattern = (18 * np.cos(2 * np.pi * yy))[..., None] * np.ones(3, np.float32)
    else:  # sand: fine speckle
        pattern = rng.normal(0, 9, (n, n, 1)).astype(np.float32)
    return np.clip(base + pattern, 0, 255).astype(np.float32)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` with radius `r` on offsets (dx, dy) from its centre (pixels)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":  # equilateral, pointing up, inscribed in the circle of radius r
        rt = 1.15 * r  # a triangle covers less area than a circle: enlarge it a little
        return (dy <= 0.5 * rt) & (np.sqrt(3.0) * np.abs(dx) <= dy + rt)
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r))
    if shape == "star":  # five points, one pointing up
        rho = np.hypot(dx, dy)
        theta = np.arctan2(dy, dx) + np.pi / 2
        return rho <= r * (0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3)
    if shape == "heart":
        u = dx / (0.82 * r)
        v = -dy / (0.82 * r) + 0.15
        return (u * u + v * v - 1) ** 3 - u * u * v**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def object_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """Boolean [size, size] mask of one object rendered alone."""
    mask = np.zeros((size, size), bool)
    _paint_mask(obj, size, mask)
    return mask


def _paint_mask(obj: ShapeObject, size: int, out: np.ndarray) -> tuple[slice, slice, np.ndarray]:
    cx, cy, r = obj.cx * size - 0.5, obj.cy * size - 0.5, obj.radius * size
    e = obj.extent * size  # corners and tips reach beyond the nominal radius
    x0, x1 = max(int(cx - e) - 1, 0), min(int(cx + e) + 2, size)
    y0, y1 = max(int(cy - e) - 1, 0), min(int(cy + e) + 2, size)
    dy, dx = np.ogrid[y0 - cy : y1 - cy, x0 - cx : x1 - cx]
    local = _shape_mask(obj.shape, dx, dy, r)
    out[y0:y1, x0:x1] |= local
    return slice(y0, y1), slice(x0, x1), local


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render `scene` at `size` x `size`.

    Returns the image (uint8 ``[size, size, 3]``) and the instance mask (int8 ``[size, size]``:
    0 = background, ``i + 1`` = object i; later objects cover earlier ones). `rng` picks the
    texture crop; without it the crop is fixed.
    """
    tex = _texture(scene.background, size)
    oy, ox = rng.integers(0, size, size=2) if rng is not None else (0, 0)
    image = tex[oy : oy + size, ox : ox + size].copy()
    instances = np.zeros((size, size), np.int8)
    scratch = np.zeros((size, size), bool)
    for i, obj in enumerate(scene.objects):
        ys, xs, local = _paint_mask(obj, size, scratch)
        image[ys, xs][local] = COLOURS[obj.colour]
        instances[ys, xs][local] = i + 1
        scratch[ys, xs] = False
    return image.astype(np.uint8), instances
