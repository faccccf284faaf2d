"""xclip.explain.render: overlays, bar charts, grids and atomic file output (headless)."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from xclip.explain.render import (
    figure_to_array,
    image_grid,
    load_map_npy,
    overlay,
    save_map_npy,
    save_png,
    token_bar_chart,
)


def _img_chw(h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_overlay_shape_dtype_and_layouts():
    img = _img_chw()
    m = torch.rand(4, 6)
    out = overlay(img, m)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    # uint8 HWC numpy input gives the same result as the float CHW tensor it came from (±1 rounding)
    u8 = np.rint(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out_u8 = overlay(u8, m.numpy())
    assert out_u8.shape == (32, 48, 3)
    assert np.abs(out_u8.astype(int) - out.astype(int)).max() <= 1
    # size=(W, H): output at another resolution
    big = overlay(img, m, size=(96, 64))
    assert big.shape == (64, 96, 3) and big.dtype == np.uint8


@pytest.mark.parametrize("zero_map", [torch.zeros(4, 6), torch.full((4, 6), 3.0)])
def test_overlay_constant_map_is_plain_blend(zero_map):
    img = _img_chw()
    alpha = 0.4
    out = overlay(img, zero_map, alpha=alpha, cmap="jet")
    c0 = np.asarray(matplotlib.colormaps["jet"](0.0)[:3])
    expected = (1 - alpha) * img.permute(1, 2, 0).double().numpy() + alpha * c0
    expected = np.rint(expected * 255)
    assert not np.isnan(out.astype(float)).any()
    assert np.abs(out.astype(float) - expected).max() <= 1.0


def test_overlay_heat_maximum_where_map_maximum_is():
    img = torch.zeros(3, 32, 48)
    m = torch.zeros(4, 6)
    m[2, 4] = 5.0  # cell rows 16..23, cols 32..39
    m[0, 0] = 1.0
    out = overlay(img, m, alpha=1.0, cmap="gray")  # output intensity == normalised heat
    grey = out[..., 0].astype(int)
    r, c = np.unravel_index(np.argmax(grey), grey.shape)
    assert 16 <= r < 24 and 32 <= c < 40
    assert grey.max() == 255
    assert grey[31, 0] == 0  # far from both hot cells: minimum heat
    # alpha=0 returns the image untouched
    img2 = _img_chw(seed=3)
    ref = np.rint(img2.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(overlay(img2, m, alpha=0.0), ref)


def test_token_bar_chart_one_bar_per_token():
    tokens = ["a", "red", "cube", "left"]
    scores = torch.tensor([0.1, 0.5, -0.2, 0.3])
    fig = token_bar_chart(tokens, scores, title="tokens")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 4
    widths = [p.get_width() for p in ax.patches]
    assert np.allclose(widths, scores.numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    assert ax.get_title() == "tokens"
    arr = figure_to_array(fig)
    w, h = fig.get_size_inches() * fig.dpi
    assert arr.dtype == np.uint8 and arr.shape == (round(h), round(w), 3)
    assert arr.std() > 0  # something was drawn
    with pytest.raises(ValueError):
        token_bar_chart(["a", "b"], [1.0])


def test_image_grid_dimensions_and_placement():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (10, 12, 3), dtype=np.uint8) for _ in range(5)]
    grid = image_grid(imgs, ncols=3, pad=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 10 + 3 * 2, 3 * 12 + 4 * 2, 3)
    # image 4 sits at row 1, col 1
    assert np.array_equal(grid[2 + 12 : 2 + 12 + 10, 2 + 14 : 2 + 14 + 12], imgs[4])
    assert np.array_equal(grid[2:12, 2:14], imgs[0])
    assert (grid[0] == 255).all()  # outer padding
    # fewer images than columns -> narrower grid; titles add a band above every row
    assert image_grid(imgs[:2], ncols=4, pad=1).shape == (12, 2 * 12 + 3, 3)
    titled = image_grid(imgs, ncols=3, pad=2, titles=[f"t{i}" for i in range(5)])
    assert titled.shape[1] == grid.shape[1] and titled.shape[0] > grid.shape[0]
    band = (titled.shape[0] - grid.shape[0]) // 2
    assert np.array_equal(titled[2 + band : 2 + band + 10, 2:14], imgs[0])
    assert (titled[2 : 2 + band, 2:14] < 128).any()  # some title text drawn


def test_save_png_roundtrip(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(1).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    p = save_png(arr, tmp_path / "sub" / "x.png")
    assert np.array_equal(np.asarray(Image.open(p).convert("RGB")), arr)
    assert sorted(f.name for f in (tmp_path / "sub").iterdir()) == ["x.png"]  # no temp leftovers


def test_save_map_npy_roundtrip_with_sidecar(tmp_path):
    m = torch.tensor([[0.0, 1.5, 2.0], [0.25, 3.0, 0.5]], dtype=torch.float64)
    npy, js = save_map_npy(m, tmp_path / "map_0.npy", image_size=(32, 48))
    assert js == tmp_path / "map_0.json"
    arr = np.load(npy)
    assert arr.dtype == np.float32 and arr.shape == (2, 3)
    assert np.array_equal(arr, m.numpy().astype(np.float32))  # raw grid, not upsampled/normalised
    meta = json.loads(js.read_text())
    assert meta == {"image_size": [32, 48], "grid_size": [2, 3], "min": 0.0, "max": 3.0}
    arr2, meta2 = load_map_npy(npy)
    assert np.array_equal(arr2, arr) and meta2 == meta
    assert sorted(f.name for f in tmp_path.iterdir()) == ["map_0.json", "map_0.npy"]
    # all-NaN map: min/max are null, still valid JSON
    _, js2 = save_map_npy(np.full((2, 2), np.nan), tmp_path / "nan.npy", image_size=(8, 8))
    assert json.loads(js2.read_text())["min"] is None
