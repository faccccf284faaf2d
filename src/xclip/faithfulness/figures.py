"""TiPAI figures: red (bad) - yellow - green (good) cell heatmaps, overlays and one comparison
figure per prompt (its images sorted by global score, chosen and rejected marked, every map).

Cells are painted over exactly the pixels they cover (the crop grid's edges), never smoothed, and
each map column shares one colour scale over the prompt's images, so chosen and rejected can be
compared by colour; the colour bar reads the raw values (cosine, Grad-ECLIP evidence, or the
head's 1 - error probability).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from xclip.faithfulness.grid import cells_to_pixels

CMAP = "RdYlGn"  # red = bad, yellow, green = good
MAP_TITLES = {"crops": "crops\ncosine", "dense": "dense\npatch cosine", "dense_gradeclip": "dense\nGrad-ECLIP",
              "head": "TSPO head\n1 - P(error)"}


def _image_hwc(image01: Tensor) -> np.ndarray:
    return image01.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def heatmap_rgb(grid: Tensor, size: tuple[int, int], lo: float, hi: float) -> np.ndarray:
    """A [G, G] goodness grid painted cell by cell over `size` (h, w) pixels with red-yellow-green
    on the scale [lo, hi]: float [h, w, 3] in [0, 1]."""
    painted = cells_to_pixels(grid.detach().float().cpu()[None], size)[0].numpy()
    span = hi - lo if hi > lo else 1.0
    return matplotlib.colormaps[CMAP](np.clip((painted - lo) / span, 0, 1))[..., :3]


def overlay_rgb(image01: Tensor, grid: Tensor, lo: float, hi: float, alpha: float = 0.5) -> np.ndarray:
    """The heatmap blended over the image: float [h, w, 3] in [0, 1]."""
    img = _image_hwc(image01)
    return (1 - alpha) * img + alpha * heatmap_rgb(grid, img.shape[:2], lo, hi)


def prompt_figure(prompt: str, images01: Tensor, global_scores: Tensor, maps: dict[str, Tensor],
                  roles: Sequence[str], labels: Sequence[str], title: str, alpha: float = 0.5,
                  panel_px: int = 120) -> Figure:
    """One prompt's comparison figure.

    Args:
        prompt: the prompt (in the title).
        images01: [R, 3, H, W] the prompt's images.
        global_scores: [R] cosine with the prompt (rows are sorted by it, best first).
        maps: name -> [R, G, G] goodness grids (``crops`` also gets a bare heatmap column).
        roles: R labels such as ``"chosen"``, ``"rejected"`` or ``""``.
        labels: R extra captions (the image id, a ShapesWorld error kind).
        title: the figure title (e.g. `xclip.explain.render.explanation_title`).
    """
    r = images01.shape[0]
    order = torch.argsort(global_scores.detach().cpu(), descending=True, stable=True).tolist()
    columns: list[tuple[str, str | None]] = [("image", None)]
    for name in maps:
        if name == "crops":
            columns.append(("crops\nheatmap", name))
        columns.append((MAP_TITLES.get(name, name), name))
    scales = {name: (float(m.min()), float(m.max())) for name, m in maps.items()}
    fig = Figure(figsize=(panel_px / 100 * 1.15 * len(columns) + 0.8, panel_px / 100 * r + 1.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(r, len(columns), squeeze=False))
    for row, i in enumerate(order):
        for col, (caption, name) in enumerate(columns):
            ax = axes[row, col]
            if name is None:
                ax.imshow(_image_hwc(images01[i]))
                role = f"{roles[i]} " if roles[i] else ""
                ax.set_ylabel(f"{role}{float(global_scores[i]):.3f}\n{labels[i]}", fontsize=6)
            elif caption == "crops\nheatmap":
                ax.imshow(heatmap_rgb(maps[name][i], tuple(images01.shape[-2:]), *scales[name]))
            else:
                ax.imshow(np.clip(overlay_rgb(images01[i], maps[name][i], *scales[name], alpha), 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(caption, fontsize=6)
    for col, (caption, name) in enumerate(columns):
        if name is not None and (caption == "crops\nheatmap" or name != "crops"):
            bar = fig.colorbar(ScalarMappable(Normalize(*scales[name]), cmap=CMAP), ax=axes[:, col].tolist(),
                               orientation="horizontal", fraction=0.04, pad=0.02)
            bar.ax.tick_params(labelsize=5)
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(top=1 - 1.05 / height, bottom=0.9 / height, left=0.08, right=0.98, hspace=0.08, wspace=0.08)
    fig.suptitle(f"{title}\nrows sorted by global cosine with the prompt (left label); red = bad, green = good",
                 fontsize=7)
    return fig
