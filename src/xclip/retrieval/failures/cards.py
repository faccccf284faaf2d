"""Visual failure cards: the caption on top, the ground-truth image left and the wrongly
retrieved top-1 image right, both overlaid with the Grad-ECLIP map *for the caption*, and the two
cosine similarities, so one sees why the wrong image won."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from xclip.retrieval.failures.extract import Failure
from xclip.explain import GradECLIP
from xclip.explain.render import image_grid, overlay, save_png


def caption_maps(explainer: GradECLIP, captions: Sequence[str], gt_images01: Tensor,
                 retrieved_images01: Tensor) -> tuple[Tensor, Tensor]:
    """Grad-ECLIP maps of each caption on its ground-truth and on its retrieved image.

    Args:
        captions: n captions.
        gt_images01, retrieved_images01: [n, 3, H, W] float in [0, 1].
    Returns:
        ``(gt_maps, retrieved_maps)``, each [n, gh, gw] raw non-negative maps (CPU).
    """
    backbone = explainer.backbone
    images = torch.cat([gt_images01, retrieved_images01]).to(backbone.device)
    # validate/test run under inference_mode; explanations need autograd on fresh tensors
    with torch.inference_mode(False), torch.enable_grad():
        maps = explainer.pair_maps(backbone.normalize(images.clone()), [*captions, *captions]).detach().cpu()
    n = len(captions)
    return maps[:n], maps[n:]


def _text_band(lines: Sequence[str], width: int) -> np.ndarray:
    """White band with `lines` of black text, uint8 [h, width, 3]."""
    font = ImageFont.load_default()
    line_h = max(font.getbbox(line or " ")[3] for line in lines) + 3
    band = Image.new("RGB", (width, line_h * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((3, 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(band)


def render_card(failure: Failure, gt_image01: Tensor, gt_map: Tensor, retrieved_image01: Tensor,
                retrieved_map: Tensor, cell_size: int = 256, alpha: float = 0.5) -> np.ndarray:
    """One card, uint8 [H, W, 3]: caption and image keys on top; below, the ground-truth (left)
    and retrieved (right) images with the caption's map, each titled with its cosine.

    Args:
        gt_image01, retrieved_image01: [3, H, W] float in [0, 1].
        gt_map, retrieved_map: [gh, gw] raw maps.
        cell_size: side of each displayed image.
    """
    size = (cell_size, cell_size)
    panels = [overlay(gt_image01, gt_map.numpy(), alpha=alpha, size=size),
              overlay(retrieved_image01, retrieved_map.numpy(), alpha=alpha, size=size)]
    titles = [f"ground truth  cos {failure.gt_score:.3f}", f"retrieved top-1  cos {failure.retrieved_score:.3f}"]
    pair = image_grid(panels, ncols=2, titles=titles)
    chars = max(20, pair.shape[1] // 6)  # PIL's default font is about 6 px per character
    lines = textwrap.wrap(f'"{failure.caption}"', chars) + [
        f"{failure.failure_id}: gt {failure.gt_key} (rank {failure.gt_rank + 1}) | retrieved {failure.retrieved_key}"[:chars]]
    return np.concatenate([_text_band(lines, pair.shape[1]), pair], axis=0)


def write_cards(explainer: GradECLIP, failures: Sequence[Failure], image_of: Callable[[int], Tensor],
                out_dir: str | Path, batch_size: int = 8, cell_size: int = 256) -> dict[str, Path]:
    """Render a card per failure into ``out_dir/<failure_id>.png`` (atomic writes).

    Args:
        explainer: a `GradECLIP` over the retrieval model's backbone.
        image_of: gallery index -> image [3, H, W] float in [0, 1].
        batch_size: failures explained per Grad-ECLIP call (2 x batch_size images).
    Returns:
        failure id -> card path.
    """
    out_dir = Path(out_dir)
    paths = {}
    for s in range(0, len(failures), batch_size):
        batch = failures[s : s + batch_size]
        gt = torch.stack([image_of(f.gt_image) for f in batch])
        retrieved = torch.stack([image_of(f.retrieved_image) for f in batch])
        gt_maps, retrieved_maps = caption_maps(explainer, [f.caption for f in batch], gt, retrieved)
        for i, f in enumerate(batch):
            card = render_card(f, gt[i], gt_maps[i], retrieved[i], retrieved_maps[i], cell_size=cell_size)
            paths[f.failure_id] = save_png(card, out_dir / f"{f.failure_id}.png")
    return paths
