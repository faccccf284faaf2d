"""Visual failure cards: the caption on top, the ground-truth image left and the wrongly
retrieved top-1 image right, both overlaid with the Grad-ECLIP map *for the caption* (colour bar,
each map's raw maximum), and the two cosine similarities, so one sees why the wrong image won."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from xclip.explain import GradECLIP
from xclip.explain.render import explanation_title, figure_to_array, panels_figure, save_png
from xclip.retrieval.failures.extract import Failure


def caption_maps(
    explainer: GradECLIP, captions: Sequence[str], gt_images01: Tensor, retrieved_images01: Tensor
) -> tuple[Tensor, Tensor]:
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


def render_card(
    failure: Failure,
    gt_image01: Tensor,
    gt_map: Tensor,
    retrieved_image01: Tensor,
    retrieved_map: Tensor,
    cell_size: int = 256,
    alpha: float = 0.5,
    explainer_name: str = "grad_eclip",
) -> np.ndarray:
    """One card, uint8 [H, W, 3]: titled with the caption, the explainer, the failure id and the
    image keys; the ground-truth (left) and retrieved (right) images with the caption's map, each
    with its cosine and its map's raw maximum, and a colour bar.

    Args:
        gt_image01, retrieved_image01: [3, H, W] float in [0, 1].
        gt_map, retrieved_map: [gh, gw] raw maps.
        cell_size: side of each displayed image.
    """
    title = explanation_title(
        failure.caption,
        explainer_name,
        failure.failure_id,
        f"gt {failure.gt_key} (rank {failure.gt_rank + 1}) vs {failure.retrieved_key}",
    )
    panels = [
        (f"ground truth, cos {failure.gt_score:.3f}", gt_image01, gt_map.numpy()),
        (f"retrieved top-1, cos {failure.retrieved_score:.3f}", retrieved_image01, retrieved_map.numpy()),
    ]
    return figure_to_array(panels_figure(panels, title, alpha=alpha, panel_px=cell_size))


def write_cards(
    explainer: GradECLIP,
    failures: Sequence[Failure],
    image_of: Callable[[int], Tensor],
    out_dir: str | Path,
    batch_size: int = 8,
    cell_size: int = 256,
) -> dict[str, Path]:
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
            card = render_card(
                f,
                gt[i],
                gt_maps[i],
                retrieved[i],
                retrieved_maps[i],
                cell_size=cell_size,
                explainer_name=explainer.name,
            )
            title = explanation_title(f.caption, explainer.name, f.failure_id)
            paths[f.failure_id] = save_png(card, out_dir / f"{f.failure_id}.png", text={"Title": title})
    return paths
