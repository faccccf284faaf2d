"""Rendering helpers for explanation maps: heat-map overlays, token bar charts, image grids and
atomic PNG / ``.npy`` output.

Everything runs headless: figures are built with :class:`matplotlib.figure.Figure` on an Agg
canvas (no pyplot, no display, no global figure registry). Inputs may be CPU/GPU torch tensors or
numpy arrays.

Image conventions accepted by :func:`overlay`, :func:`image_grid` and :func:`save_png`:

* ``uint8`` arrays are HWC (``[H, W, 3]``, ``[H, W, 4]`` drops alpha, ``[H, W]`` is grey);
  a ``uint8`` ``[3, H, W]`` whose last dim is not 1/3/4 is read as CHW;
* floating arrays hold values in ``[0, 1]`` (clipped, NaN -> 0) and are CHW (``[3, H, W]``),
  unless the last dim is 1/3/4 and the first is not, which is read as HWC.
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, ImageDraw, ImageFont

from xclip.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "overlay",
    "token_bar_chart",
    "image_grid",
    "figure_to_array",
    "save_png",
    "save_map_npy",
    "load_map_npy",
    "explanation_figure",
    "explanation_title",
    "panels_figure",
]


# --------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------


def constant_map_label(map_: torch.Tensor | np.ndarray) -> str | None:
    """``"all-zero map"`` / ``"constant map (v)"`` for a map holding one value (it has no maximum,
    so a colour scale would paint it as uniformly bad or good), else None."""
    values = np.asarray(_to_numpy(map_), dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi > lo:
        return None
    return "all-zero map" if hi == 0.0 else f"constant map ({hi:.3g})"


def draw_map_label(ax: Axes, label: str, fontsize: float = 10) -> None:
    """`label` in a dark box at the centre of the matplotlib axes `ax` (over the painted map)."""
    ax.text(
        0.5,
        0.5,
        label,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=fontsize,
        color="white",
        bbox={"facecolor": "black", "alpha": 0.7, "edgecolor": "none", "pad": 2},
    )


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_float_hwc(image) -> np.ndarray:
    """Any accepted image -> float64 ``[H, W, 3]`` in ``[0, 1]``."""
    a = _to_numpy(image)
    if a.dtype == np.uint8:
        # HWC unless it can only be CHW
        if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
            a = a.transpose(1, 2, 0)
        a = a.astype(np.float64) / 255.0
    else:
        # CHW unless it can only be HWC
        if a.ndim == 3 and not (a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4)):
            a = a.transpose(1, 2, 0)
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image [H, W, C] or [C, H, W], got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    elif a.shape[-1] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {a.shape}")
    return a


def _to_uint8_hwc(image) -> np.ndarray:
    a = _to_numpy(image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3:
        return np.ascontiguousarray(a)
    return np.clip(np.rint(_to_float_hwc(image) * 255.0), 0, 255).astype(np.uint8)


def _resize_float_hwc(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    down = hw[0] < img.shape[0] or hw[1] < img.shape[1]
    t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=down)
    return t[0].numpy().transpose(1, 2, 0).clip(0.0, 1.0)


def _normalised_heat(map_, hw: tuple[int, int]) -> np.ndarray:
    """Raw ``[gh, gw]`` map -> ``[H, W]`` float64 in ``[0, 1]`` (bilinear, min-max; constant -> 0)."""
    m = torch.as_tensor(_to_numpy(map_), dtype=torch.float64)
    if m.ndim != 2:
        m = m.squeeze()
    if m.ndim != 2:
        raise ValueError(f"map must be [gh, gw], got shape {tuple(m.shape)}")
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    up = F.interpolate(m[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    if not hi > lo:
        return np.zeros(hw, dtype=np.float64)
    return ((up - lo) / (hi - lo)).clamp(0.0, 1.0).numpy()


# --------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------
def overlay(
    image,
    map,  # the public name (shadows the builtin inside these functions only)
    alpha: float = 0.5,
    cmap: str = "jet",
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Blend a colour-mapped explanation map over an image.

    Args:
        image: ``[3, H, W]`` float in ``[0, 1]`` (tensor or numpy) or ``uint8`` ``[H, W, 3]``
            (see module docstring for all accepted layouts).
        map: raw patch-grid map ``[gh, gw]``. It is bilinearly upsampled
            (``align_corners=False``) to the output size and min-max normalised; a constant
            (e.g. all-zero) map gives zero heat everywhere (no NaN).
        alpha: weight of the colour map: ``out = (1 - alpha) * image + alpha * cmap(heat)``.
        cmap: matplotlib colormap name.
        size: output ``(W, H)`` (PIL order, e.g. the original image size); the image is resized
            bilinearly (antialiased when shrinking). ``None``: the image's own size.

    Returns:
        ``uint8`` ``[H', W', 3]``.
    """
    img = _to_float_hwc(image)
    hw = (img.shape[0], img.shape[1]) if size is None else (int(size[1]), int(size[0]))
    img = _resize_float_hwc(img, hw)
    heat = _normalised_heat(map, hw)
    colours = matplotlib.colormaps[cmap](heat)[..., :3]
    out = (1.0 - alpha) * img + alpha * colours
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure (on an Agg canvas, attached if needed) to ``uint8`` ``[H, W, 3]``."""
    canvas = fig.canvas
    if not isinstance(canvas, FigureCanvasAgg):
        canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _wrap_lines(title: str, width: int) -> list[str]:
    """`title`'s lines, each wrapped to at most `width` characters (long words broken)."""
    return [piece for line in title.splitlines() for piece in (textwrap.wrap(line, width) or [""])] if title else []


def token_bar_chart(tokens: Sequence[str], scores, title: str = "", *, legend: tuple[str, str] | None = None) -> Figure:
    """Horizontal bar chart of per-token scores, first token at the top, one bar per token.

    Positive bars are red, negative ones blue; `legend` names what each sign means (e.g.
    ``("towards 'sand'", "away from 'sand'")``). Every title line is wrapped to the figure's
    width (a long text or item id is never cut off). The figure lives on an Agg canvas (no
    display); render it with :func:`figure_to_array` or ``fig.savefig``.

    Args:
        tokens: ``T`` labels.
        scores: ``T`` floats (list, numpy or tensor, any shape with ``T`` elements).
        title: axes title (may hold several lines).
        legend: (meaning of a positive bar, of a negative bar); None: no legend.

    Raises:
        ValueError: ``len(tokens) != number of scores``.
    """
    vals = np.asarray(_to_numpy(scores), dtype=np.float64).reshape(-1)
    tokens = [str(t) for t in tokens]
    if len(tokens) != vals.size:
        raise ValueError(f"{len(tokens)} tokens but {vals.size} scores")
    width_in, title_pt = 7.0, 9.0
    # DejaVu Sans averages ~0.6 em per character: wrap to that first, then measure (below)
    lines = _wrap_lines(title, int(width_in * 72 / (title_pt * 0.65)) - 4)

    def height(n_lines: int) -> float:
        return max(2.0, 0.35 * len(tokens) + 1.0) + 0.17 * n_lines + (0.4 if legend else 0.0)

    fig = Figure(figsize=(width_in, height(len(lines))), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(tokens))
    colours = ["tab:red" if v >= 0 else "tab:blue" for v in vals]
    ax.barh(y, vals, color=colours)
    ax.set_yticks(y)
    ax.set_yticklabels(tokens)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("score")
    if lines:
        ax.set_title("\n".join(lines), fontsize=title_pt)
        renderer = canvas.get_renderer()
        for _ in range(3):  # wide glyphs (W, M, CJK): re-wrap until the measured title fits the figure
            ratio = ax.title.get_window_extent(renderer).width / (0.96 * fig.bbox.width)
            if ratio <= 1:
                break
            longest = max(len(line) for line in lines)
            lines = _wrap_lines(title, max(8, int(longest / ratio) - 1))
            ax.set_title("\n".join(lines), fontsize=title_pt)
        fig.set_size_inches(width_in, height(len(lines)))
    legend_in = 0.0
    if legend:  # under the figure, clear of the axis label
        handles = [
            Patch(color="tab:red", label=f"> 0: {legend[0]}"),
            Patch(color="tab:blue", label=f"< 0: {legend[1]}"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
        legend_in = 0.3
    fig.tight_layout(rect=(0.0, legend_in / fig.get_size_inches()[1], 1.0, 1.0))
    if lines:  # centred on the figure, not on the axes (which long token labels push to the right)
        box = ax.get_position()
        ax.title.set_x((0.5 - box.x0) / box.width)
    return fig


def explanation_title(text: str, explainer: str, item_id: str, where: str = "") -> str:
    """The title of an explanation image: the explained text (quoted, wrapped), then the explainer,
    the item id and (optionally) where the item came from (task / dataloader)."""
    quoted = textwrap.fill(f'"{text}"', width=60, max_lines=3, placeholder=' ..."')
    origin = f" | {where}" if where else ""
    return f"{quoted}\n{explainer} | item {item_id}{origin}"


def panels_figure(
    panels: Sequence[tuple[str, object, object]], title: str, alpha: float = 0.5, cmap: str = "jet", panel_px: int = 192
) -> Figure:
    """Images side by side under a title; a panel with a map shows it over its image.

    Each overlay is min-max scaled on its own, so the shared colour bar reads 0..1 of each map's
    range and every overlay's caption gives its raw maximum: a map peaking at 1e-6 no longer looks
    as hot as one peaking at 0.2. A constant map (e.g. all zero: ReLU removed everything) is
    labelled as such in its panel.

    Args:
        panels: ``(caption, image, map)`` triples; `map` is a raw ``[gh, gw]`` patch-grid map, or
            None to show the image as it is.
        title: e.g. :func:`explanation_title`.
        panel_px: rendered longer side of each panel.
    """
    fig = Figure(figsize=(2.3 * len(panels) + 0.9, 2.6 + 0.22 * (title.count("\n") + 1)), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (caption, image, map_) in zip(axes, panels):
        img = _to_float_hwc(image)
        h, w = img.shape[:2]
        scale = panel_px / max(h, w)
        shown = _resize_float_hwc(img, (max(1, round(h * scale)), max(1, round(w * scale))))
        if map_ is not None:
            raw = np.nan_to_num(
                np.asarray(_to_numpy(map_), dtype=np.float64).squeeze(), nan=0.0, posinf=0.0, neginf=0.0
            )
            hi = float(raw.max())
            shown = overlay(shown, raw, alpha=alpha, cmap=cmap)
            caption = f"{caption}\nraw max {hi:.3g}"
            label = constant_map_label(raw)
            if label:
                draw_map_label(ax, label)
        ax.imshow(shown)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=8)
    if any(m is not None for _, _, m in panels):
        bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=cmap), ax=list(axes), fraction=0.035, pad=0.02)
        bar.set_label("each map min-max scaled (0 = its min, 1 = its max)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=8)
    return fig


def explanation_figure(
    image,
    map,
    title: str,
    alpha: float = 0.5,
    cmap: str = "jet",
    extra_panels: Sequence[tuple[str, object]] = (),
    panel_px: int = 192,
) -> Figure:
    """The image, then the map over it (colour bar, raw maximum, all-zero label; see
    `panels_figure`), then optional ``(caption, image)`` extra panels, under `title`."""
    panels = [("image", image, None), ("map", image, map)] + [(c, extra, None) for c, extra in extra_panels]
    return panels_figure(panels, title, alpha=alpha, cmap=cmap, panel_px=panel_px)


# --------------------------------------------------------------------------------------------
# image grid
# --------------------------------------------------------------------------------------------
def image_grid(
    images: Sequence,
    ncols: int,
    pad: int = 2,
    titles: Sequence[str] | None = None,
    pad_value: int = 255,
) -> np.ndarray:
    """Tile images into one ``uint8`` ``[H, W, 3]`` array (plain numpy, no matplotlib).

    Layout: ``ncols' = min(ncols, n)`` columns and ``ceil(n / ncols')`` rows of cells of size
    ``max h x max w``; each image sits at the top-left of its cell; ``pad`` pixels of
    ``pad_value`` separate the cells and surround the grid, so
    ``H = rows * (cell_h + title_h) + (rows + 1) * pad`` and ``W = ncols' * cell_w + (ncols' + 1) * pad``.

    Titles: when ``titles`` is given (one per image), a white band of ``title_h`` pixels (the
    height of PIL's default font plus 4) with the title in black is added *above* each cell, text
    clipped to the cell width. Without titles ``title_h = 0``.
    """
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image")
    if ncols < 1:
        raise ValueError("ncols must be >= 1")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    arrs = [_to_uint8_hwc(im) for im in images]
    n = len(arrs)
    cols = min(int(ncols), n)
    rows = math.ceil(n / cols)
    ch = max(a.shape[0] for a in arrs)
    cw = max(a.shape[1] for a in arrs)
    font = None
    title_h = 0
    if titles is not None:
        font = ImageFont.load_default()
        boxes = [font.getbbox(str(t) or " ") for t in titles]
        title_h = math.ceil(max(b[3] for b in boxes)) + 4
    H = rows * (ch + title_h) + (rows + 1) * pad
    W = cols * cw + (cols + 1) * pad
    grid = np.full((H, W, 3), pad_value, dtype=np.uint8)
    for i, a in enumerate(arrs):
        r, c = divmod(i, cols)
        y0 = pad + r * (ch + title_h + pad)
        x0 = pad + c * (cw + pad)
        if titles is not None:
            band = Image.new("RGB", (cw, title_h), (255, 255, 255))
            ImageDraw.Draw(band).text((1, 1), str(titles[i]), fill=(0, 0, 0), font=font)
            grid[y0 : y0 + title_h, x0 : x0 + cw] = np.asarray(band)
            y0 += title_h
        grid[y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]] = a
    return grid


# --------------------------------------------------------------------------------------------
# output files
# --------------------------------------------------------------------------------------------
def save_png(array, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Write an image (``uint8`` HWC, or any layout accepted by the module) as PNG, atomically;
    `text` goes into the PNG's text chunks (e.g. ``{"Title": ...}``, read back with
    ``PIL.Image.open(path).text``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))
    buf = io.BytesIO()
    Image.fromarray(_to_uint8_hwc(array)).save(buf, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buf.getvalue())


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def save_map_npy(
    map, path: str | os.PathLike, image_size: tuple[int, int], extra: dict | None = None
) -> tuple[Path, Path]:
    """Save the RAW patch-grid map (float32 ``[gh, gw]``, not upsampled, not normalised) as
    ``.npy`` plus a sidecar JSON (``path`` with suffix ``.json``)::

        {"image_size": [H, W], "grid_size": [gh, gw], "min": float, "max": float, **extra}

    (`extra`: what the map explains, e.g. text, explainer, item id, title.)

    ``min``/``max`` ignore NaN and are ``null`` when no finite value exists. Both files are
    written atomically (temporary name in the same directory, then ``os.replace``), the ``.npy``
    first.

    Returns:
        ``(npy_path, json_path)``.
    """
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError("the map path must not end in .json (that is the sidecar's name)")
    arr = np.ascontiguousarray(_to_numpy(map), dtype=np.float32)
    if arr.ndim != 2:
        arr = arr.squeeze()
    if arr.ndim != 2:
        raise ValueError(f"map must be [gh, gw], got shape {arr.shape}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    npy_path = atomic_write_bytes(path, buf.getvalue())
    finite = arr[np.isfinite(arr)]
    meta = {
        "image_size": [int(image_size[0]), int(image_size[1])],
        "grid_size": [int(arr.shape[0]), int(arr.shape[1])],
        "min": _json_float(float(finite.min())) if finite.size else None,
        "max": _json_float(float(finite.max())) if finite.size else None,
        **(extra or {}),
    }
    json_path = atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return npy_path, json_path


def load_map_npy(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a map written by :func:`save_map_npy`: ``(float32 [gh, gw], sidecar dict)``."""
    path = Path(path)
    arr = np.load(path, allow_pickle=False)
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return arr, meta
