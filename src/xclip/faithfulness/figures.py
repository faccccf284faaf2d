"""TiPAI figures: red (bad) - yellow - green (good) cell heatmaps, overlays and one comparison
figure per prompt (its images sorted by global score, chosen and rejected marked, every map).

Cells are painted over exactly the pixels they cover (the crop grid's edges), never smoothed, and
each map column shares one colour scale over the prompt's images, so chosen and rejected can be
compared by colour; the colour bar under each map column reads the raw values (cosine,
Grad-ECLIP evidence, or the head's 1 - error probability). A column whose maps all hold one value
(e.g. an all-zero Grad-ECLIP map) has no colour scale: it is painted grey, not as "bad", and
labelled; a single image's constant map on a shared scale keeps its colour and is labelled too.
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
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from xclip.explain.render import constant_map_label, draw_map_label
from xclip.faithfulness.grid import cells_to_pixels

CMAP = "RdYlGn"  # red = bad, yellow, green = good
NEUTRAL = (0.6, 0.6, 0.6)  # a map without a colour scale (one value everywhere)
BAR_INCHES = 0.14  # height of a colour bar
MAP_TITLES = {
    "crops": "crops\ncosine",
    "dense": "dense\npatch cosine",
    "dense_gradeclip": "dense\nGrad-ECLIP",
    "head": "TSPO head\n1 - P(error)",
}


def _image_hwc(image01: Tensor) -> np.ndarray:
    return image01.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def heatmap_rgb(grid: Tensor, size: tuple[int, int], lo: float, hi: float) -> np.ndarray:
    """A [G, G] goodness grid painted cell by cell over `size` (h, w) pixels with red-yellow-green
    on the scale [lo, hi]: float [h, w, 3] in [0, 1]."""
    painted = cells_to_pixels(grid.detach().float().cpu()[None], size)[0].numpy()
    if not hi > lo:  # one value on the whole scale: nothing is better or worse than anything else
        return np.broadcast_to(np.asarray(NEUTRAL), (*painted.shape, 3)).copy()
    return matplotlib.colormaps[CMAP](np.clip((painted - lo) / (hi - lo), 0, 1))[..., :3]


def overlay_rgb(image01: Tensor, grid: Tensor, lo: float, hi: float, alpha: float = 0.5) -> np.ndarray:
    """The heatmap blended over the image: float [h, w, 3] in [0, 1]."""
    img = _image_hwc(image01)
    return (1 - alpha) * img + alpha * heatmap_rgb(grid, img.shape[:2], lo, hi)


def prompt_figure(
    prompt: str,
    images01: Tensor,
    global_scores: Tensor,
    maps: dict[str, Tensor],
    roles: Sequence[str],
    labels: Sequence[str],
    title: str,
    alpha: float = 0.5,
    panel_px: int = 120,
) -> Figure:
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
    for map_name in maps:
        if map_name == "crops":
            columns.append(("crops\nheatmap", map_name))
        columns.append((MAP_TITLES.get(map_name, map_name), map_name))
    scales = {name: (float(m.min()), float(m.max())) for name, m in maps.items()}
    fig = Figure(figsize=(panel_px / 100 * 1.15 * len(columns) + 0.8, panel_px / 100 * r + 2.1), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(r, len(columns), squeeze=False))
    for row, i in enumerate(order):
        for col, (caption, name) in enumerate(columns):
            ax = axes[row, col]
            if name is None:
                ax.imshow(_image_hwc(images01[i]))
                role = f"{roles[i]} " if roles[i] else ""
                ax.set_ylabel(f"{role}{float(global_scores[i]):.3f}\n{labels[i]}", fontsize=7)
            else:
                if caption == "crops\nheatmap":
                    ax.imshow(heatmap_rgb(maps[name][i], (images01.shape[-2], images01.shape[-1]), *scales[name]))
                else:
                    ax.imshow(np.clip(overlay_rgb(images01[i], maps[name][i], *scales[name], alpha), 0, 1))
                label = constant_map_label(maps[name][i])
                if label:
                    draw_map_label(ax, label, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(caption, fontsize=8)
    height = fig.get_size_inches()[1]
    bottom = 1.15 / height  # room for the colour bars and their labels
    fig.subplots_adjust(top=1 - 1.05 / height, bottom=bottom, left=0.08, right=0.98, hspace=0.08, wspace=0.08)
    for col, (_, name) in enumerate(columns):
        if name is None:
            continue
        box = axes[-1, col].get_position()
        cax = fig.add_axes((box.x0, bottom - 0.32 / height, box.width, BAR_INCHES / height))
        lo, hi = scales[name]
        if hi > lo:
            bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap=CMAP), cax=cax, orientation="horizontal")
            bar.ax.xaxis.set_major_locator(MaxNLocator(3))
            bar.ax.tick_params(labelsize=8, length=3)
            bar.set_label("bad  -  good", fontsize=7, labelpad=1)
        else:  # no scale: say so where the bar would be
            cax.set_axis_off()
            cax.text(
                0.5,
                0.0,
                f"one value: {hi:.3g}\n(no colour scale)",
                ha="center",
                va="top",
                fontsize=7,
                transform=cax.transAxes,
            )
    fig.suptitle(
        f"{title}\nrows sorted by global cosine with the prompt (left label); red = bad, green = good", fontsize=8
    )
    return fig


def patch_prediction_figure(rows: list[tuple], grid: tuple[int, int]) -> Figure:
    """The TSPO head's patch predictions: image | error target | head P(error) | crops badness, one row
    per rendering (`rows`: (prompt, error name, image01 [3, H, W], target [P], P(error) [P], crops [P] or None)).
    """
    cols = 4 if any(r[5] is not None for r in rows) else 3
    fig = Figure(figsize=(1.6 * cols, 1.6 * len(rows) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(rows), cols, squeeze=False))
    for k, (prompt, error, image, target, prob, crops) in enumerate(rows):
        panels = [
            (image.permute(1, 2, 0).numpy(), f"{error}"),
            (target.view(grid).float().numpy(), "error patches"),
            (prob.view(grid).float().numpy(), "head P(error)"),
        ]
        if cols == 4:
            panels.append(((crops if crops is not None else torch.zeros(grid)).view(grid).numpy(), "crops badness"))
        for c, (arr, title) in enumerate(panels):
            ax = axes[k, c]
            ax.imshow(arr, vmin=0, vmax=1, cmap=None if arr.ndim == 3 else "magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=6)
        axes[k, 0].set_ylabel(prompt[:40], fontsize=5)
    fig.tight_layout()
    return fig
