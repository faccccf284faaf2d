"""The crop grid covers every image exactly (odd sizes, no off-by-one at the borders), the batched
crops equal cropping and resizing each cell alone, and the patch-map resampling is exact."""

import pytest
import torch
import torch.nn.functional as F

from xclip.faithfulness.grid import (
    cell_edges,
    cell_means,
    cells_to_pixels,
    crop_cells,
    resample_to_cells,
)

SIZES = [(64, 64), (37, 53), (7, 7), (101, 9), (225, 224)]


@pytest.mark.parametrize("size", [7, 9, 37, 53, 64, 101, 225])
@pytest.mark.parametrize("cells", [1, 3, 7])
def test_edges_partition_the_side(size, cells):
    edges = cell_edges(size, cells)
    assert edges[0] == 0 and edges[-1] == size
    lengths = edges[1:] - edges[:-1]
    assert (lengths >= 1).all() and lengths.max() - lengths.min() <= 1
    owner = torch.zeros(size, dtype=torch.int64)
    for i in range(cells):  # brute force: every pixel in exactly one cell
        owner[edges[i] : edges[i + 1]] += 1
    assert (owner == 1).all()


def test_too_many_cells_is_refused():
    with pytest.raises(ValueError, match="cannot hold 8 non-empty cells"):
        cell_edges(7, 8)


def _cell_id_image(h, w, cells):
    ey, ex = cell_edges(h, cells), cell_edges(w, cells)
    rows = torch.bucketize(torch.arange(h), ey[1:], right=True)
    cols = torch.bucketize(torch.arange(w), ex[1:], right=True)
    return (rows[:, None] * cells + cols[None, :]).double()


@pytest.mark.parametrize("h,w", SIZES)
def test_each_crop_reads_only_its_own_cell_and_reaches_both_borders(h, w):
    cells = 7
    ids = _cell_id_image(h, w, cells)
    ys = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    images = torch.stack([ids, ys, xs])[None]  # [1, 3, H, W]: cell id, row, column
    crops = crop_cells(images, cells, 64)[0]  # [49, 3, 64, 64]
    ey, ex = cell_edges(h, cells), cell_edges(w, cells)
    for k in range(cells * cells):
        r, c = divmod(k, cells)
        assert torch.allclose(crops[k, 0], torch.full_like(crops[k, 0], k), atol=1e-9), (
            f"crop {k} mixes in another cell"
        )
        # upsampled (cells are smaller than 64 px): the samples span the cell's first to last pixel
        assert crops[k, 1].min().item() == pytest.approx(ey[r].item(), abs=1e-9)
        assert crops[k, 1].max().item() == pytest.approx(ey[r + 1].item() - 1, abs=1e-9)
        assert crops[k, 2].min().item() == pytest.approx(ex[c].item(), abs=1e-9)
        assert crops[k, 2].max().item() == pytest.approx(ex[c + 1].item() - 1, abs=1e-9)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("out", [16, 64])
def test_batched_crops_equal_cropping_each_cell_alone(h, w, out):
    torch.manual_seed(0)
    images = torch.rand(2, 3, h, w, dtype=torch.float64)
    cells = 3
    got = crop_cells(images, cells, out)
    ey, ex = cell_edges(h, cells), cell_edges(w, cells)
    for r in range(cells):
        for c in range(cells):
            cell = images[:, :, ey[r] : ey[r + 1], ex[c] : ex[c + 1]]
            want = F.interpolate(cell, size=(out, out), mode="bilinear", align_corners=False)
            assert torch.allclose(got[:, r * cells + c], want, atol=1e-10), (r, c)


def test_resample_to_cells_is_the_area_mean():
    torch.manual_seed(0)
    maps = torch.rand(2, 8, 8, dtype=torch.float64)
    h, w = 63, 70
    got = resample_to_cells(maps, 7, (h, w))
    # brute force on a fine sub-pixel raster: each pixel split into 8 x 8 sub-pixels (16 x 16 patch
    # boundaries fall on 1/8-pixel steps only approximately, so compare against a 1/64 raster)
    fine = 64
    patch_y = (torch.arange(h * fine) + 0.5) / (h * fine) * 8
    patch_x = (torch.arange(w * fine) + 0.5) / (w * fine) * 8
    dense = maps[:, patch_y.long()][:, :, patch_x.long()]
    want = cell_means(dense, 7)
    assert torch.allclose(got, want, atol=2e-3)
    assert torch.allclose(resample_to_cells(maps, 8, (64, 64)), maps)


def test_cell_means_and_painting_round_trip():
    masks = torch.zeros(1, 37, 53)
    masks[0, 10:20, 30:45] = 1
    means = cell_means(masks, 7)
    ey, ex = cell_edges(37, 7), cell_edges(53, 7)
    for r in range(7):
        for c in range(7):
            want = masks[0, ey[r] : ey[r + 1], ex[c] : ex[c + 1]].double().mean()
            assert means[0, r, c].item() == pytest.approx(want.item())
    painted = cells_to_pixels(means, (37, 53))
    assert torch.allclose(cell_means(painted, 7), means)
