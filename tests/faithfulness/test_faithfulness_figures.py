"""TiPAI figures: an all-zero map is labelled and painted without a colour scale (never as uniform
"bad" red), and every map column has a colour bar under it that is large enough to read."""

import matplotlib
import numpy as np
import pytest
import torch

from xclip.explain.render import constant_map_label as constant_label
from xclip.faithfulness.figures import (
    CMAP,
    NEUTRAL,
    heatmap_rgb,
    prompt_figure,
)


def _figure(maps: dict[str, torch.Tensor]):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return prompt_figure(
        "a red circle",
        images,
        torch.tensor([0.3, 0.2, 0.1]),
        maps,
        ["chosen", "", "rejected"],
        ["seed 0", "seed 1", "seed 2"],
        "title",
    )


def test_a_map_without_a_scale_is_grey_and_labelled():
    zeros = torch.zeros(2, 2)
    assert np.array_equal(heatmap_rgb(zeros, (4, 4), 0.0, 0.0), np.broadcast_to(NEUTRAL, (4, 4, 3)))
    assert not np.allclose(heatmap_rgb(zeros, (4, 4), 0.0, 0.0), matplotlib.colormaps[CMAP](0.0)[:3])  # not "bad"
    assert constant_label(zeros) == "all-zero map"
    assert constant_label(torch.full((2, 2), 0.25)) == "constant map (0.25)"
    assert constant_label(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) is None
    # on a shared scale a single constant image keeps its colour, and is labelled
    assert np.allclose(heatmap_rgb(zeros, (4, 4), 0.0, 1.0), matplotlib.colormaps[CMAP](0.0)[:3])

    varied = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(1))
    fig = _figure({"crops": varied, "dense_gradeclip": torch.zeros(3, 2, 2)})
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("all-zero map") == 3
    assert "one value: 0\n(no colour scale)" in texts


def test_every_map_column_has_a_readable_colour_bar_under_it():
    maps = {"crops": torch.rand(3, 2, 2), "dense": torch.rand(3, 2, 2) * 0.1}
    fig = _figure(maps)
    height = fig.get_size_inches()[1]
    grid = [ax for ax in fig.axes if ax.get_images()]  # 3 rows x 4 columns: image, crops heatmap, crops, dense
    columns = sorted({round(ax.get_position().x0, 4) for ax in grid})
    bars = [ax for ax in fig.axes if not ax.get_images() and ax.collections]  # a colour bar draws a mesh
    assert len(columns) == 4 and len(bars) == 3
    lowest = min(ax.get_position().y0 for ax in grid)
    for bar, x0 in zip(sorted(bars, key=lambda a: a.get_position().x0), columns[1:]):
        box = bar.get_position()
        assert box.x0 == pytest.approx(x0, abs=1e-3) and box.y1 < lowest  # under its own column
        assert box.height * height >= 0.12  # inches
        labels = [t for t in bar.get_xticklabels() if t.get_text()]
        assert labels and min(t.get_fontsize() for t in labels) >= 8
