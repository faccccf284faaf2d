"""The G x G cell grid of TiPAI's patch scores: cell boundaries that tile an image of any size
exactly, every cell of every image cropped and resized in one batched call, and exact area
resampling of a ViT patch map onto the cells.

Cell i of a side of `size` pixels spans ``[edges[i], edges[i+1])`` with
``edges[i] = floor(i * size / G)``: the cells partition the side (no pixel dropped or counted
twice, whatever the size), and their lengths differ by at most one pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cell_edges(size: int, cells: int) -> Tensor:
    """Pixel boundaries of `cells` cells along a side of `size` pixels: int64 [cells + 1],
    ``edges[0] = 0``, ``edges[-1] = size``."""
    if cells < 1:
        raise ValueError(f"the grid needs at least one cell per side, got {cells}")
    if size < cells:
        raise ValueError(
            f"a side of {size} pixels cannot hold {cells} non-empty cells: use a smaller grid or a larger image"
        )
    return torch.arange(cells + 1, dtype=torch.int64) * size // cells


def _cell_sample_coords(size: int, cells: int, out: int) -> Tensor:
    """Source coordinates [cells, out] (pixels) of the `out` output samples of each cell, as
    ``F.interpolate(bilinear, align_corners=False)`` of that cell alone would read them: the
    sample centre ``start + (j + 0.5) * length / out - 0.5`` clamped to the cell's own pixels
    (so no sample reads a neighbouring cell)."""
    edges = cell_edges(size, cells).double()
    start, length = edges[:-1, None], (edges[1:] - edges[:-1])[:, None]
    j = torch.arange(out, dtype=torch.float64)[None, :]
    src = start + (j + 0.5) * length / out - 0.5
    return torch.minimum(torch.maximum(src, start), start + length - 1)


def _to_unit(coords: Tensor, size: int) -> Tensor:
    """Pixel coordinates -> grid_sample's [-1, 1] with align_corners=True."""
    return coords * (2.0 / (size - 1)) - 1.0 if size > 1 else torch.zeros_like(coords)


def crop_cells(images: Tensor, cells: int, out_size: int | tuple[int, int]) -> Tensor:
    """Every cell of every image, each resized to `out_size`: [N, C, H, W] -> [N, G*G, C, oh, ow]
    (cells in row-major order).

    Equal to cropping each cell and resizing it with ``F.interpolate(mode="bilinear",
    align_corners=False)`` (no antialiasing: cells are normally smaller than the model input),
    done for all cells of all images in one ``grid_sample`` call without copying the images.
    """
    if images.ndim != 4:
        raise ValueError(f"crop_cells needs images [N, C, H, W], got {tuple(images.shape)}")
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    n, c, h, w = images.shape
    ys = _to_unit(_cell_sample_coords(h, cells, oh), h)  # [G, oh]
    xs = _to_unit(_cell_sample_coords(w, cells, ow), w)  # [G, ow]
    # grid [G(rows), G(cols), oh, ow, 2] as (x, y), stacked along the output height
    gy = ys[:, None, :, None].expand(cells, cells, oh, ow)
    gx = xs[None, :, None, :].expand(cells, cells, oh, ow)
    grid = torch.stack([gx, gy], dim=-1).reshape(1, cells * cells * oh, ow, 2)
    grid = grid.to(device=images.device, dtype=images.dtype).expand(n, -1, -1, -1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(n, c, cells * cells, oh, ow).transpose(1, 2)


def _overlap_weights(cells: int, patches: int, size: int) -> Tensor:
    """[cells, patches]: the share of cell i (pixel edges on a side of `size`) covered by patch j
    (patches tile the side uniformly). Rows sum to 1."""
    edges = cell_edges(size, cells).double() / size
    lo, hi = edges[:-1, None], edges[1:, None]
    p = torch.arange(patches + 1, dtype=torch.float64) / patches
    overlap = (torch.minimum(hi, p[None, 1:]) - torch.maximum(lo, p[None, :-1])).clamp_min(0)
    return overlap / (hi - lo)


def resample_to_cells(maps: Tensor, cells: int, image_size: tuple[int, int]) -> Tensor:
    """A patch-grid map over the whole image [N, gh, gw] -> the mean of the map over each cell of
    the G x G grid of an image of `image_size` (h, w) pixels: [N, G, G] (exact area weights)."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, gh, gw], got {tuple(maps.shape)}")
    wy = _overlap_weights(cells, maps.shape[1], image_size[0]).to(maps)
    wx = _overlap_weights(cells, maps.shape[2], image_size[1]).to(maps)
    return wy @ maps @ wx.T


def cell_means(masks: Tensor, cells: int) -> Tensor:
    """Mean of a pixel map over each cell: [N, H, W] -> [N, G, G] float (an error mask's share of
    each cell; ``> 0`` marks the cells the error touches). Exact sums from an integral image."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    x = masks.double()
    integral = F.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))  # [N, H+1, W+1]
    ey, ex = cell_edges(x.shape[1], cells).to(x.device), cell_edges(x.shape[2], cells).to(x.device)
    sums = (
        integral[:, ey[1:]][:, :, ex[1:]]
        - integral[:, ey[:-1]][:, :, ex[1:]]
        - integral[:, ey[1:]][:, :, ex[:-1]]
        + integral[:, ey[:-1]][:, :, ex[:-1]]
    )
    area = (ey[1:] - ey[:-1]).double()[:, None] * (ex[1:] - ex[:-1]).double()[None, :]
    return sums / area


def cells_to_pixels(grid_maps: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Paint each cell's value over its pixels: [N, G, G] -> [N, H, W] (the inverse layout of
    `cell_means`, with the same edges)."""
    g = grid_maps.shape[-1]
    rows = torch.bucketize(torch.arange(image_size[0]), cell_edges(image_size[0], g)[1:], right=True)
    cols = torch.bucketize(torch.arange(image_size[1]), cell_edges(image_size[1], g)[1:], right=True)
    return grid_maps[:, rows.to(grid_maps.device)][:, :, cols.to(grid_maps.device)]
