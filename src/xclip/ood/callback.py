"""`OODExplanationCallback`: NegAlign's CAM maps of a few ID and OOD images: image | CAM overlay |
background region.

The maps are the ones the module scored with (``NegAlignModule.step`` returns them), so nothing
is recomputed. Per split, the first `max_items` images go to TensorBoard
(``<stage>/ood/cam/<split>_<index>``) and to ``<run dir>/<subdir>/<stage>/`` as PNG (titled with the
explained class, the explainer and the item, with a colour bar and the CAM's raw maximum) plus the
raw CAM as NPY (patch grid) with its JSON sidecar, and ``index.json`` there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xclip.engine import StageCallback
from xclip.explain.render import explanation_figure, explanation_title, figure_to_array, save_map_npy, save_png


def background_view(image01: torch.Tensor, fg_mask: torch.Tensor, dim: float = 0.25) -> np.ndarray:
    """uint8 [H, W, 3]: the image with its CAM foreground patches (`fg_mask` [gh, gw]) dimmed to
    `dim`, so what remains bright is the region pooled into the background embedding."""
    fg = F.interpolate(fg_mask[None, None].float(), size=image01.shape[-2:], mode="nearest")[0]
    shown = image01 * (1 - (1 - dim) * fg)
    return (shown.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


class OODExplanationCallback(StageCallback):
    """Log NegAlign's CAM foreground/background for the first `max_items` images of each split.

    Args:
        max_items: images per split (ID, each OOD set; calibration is skipped).
        alpha: CAM overlay opacity.
        panel_px: side of each panel of the PNG / TensorBoard images.
        subdir: folder under the log directory.
    """

    workflow = "ood"

    def __init__(self, max_items: int = 4, alpha: float = 0.5, panel_px: int = 192, subdir: str = "explanations/ood"):
        if max_items < 0:
            raise ValueError("max_items must be >= 0")
        super().__init__(subdir)
        self.max_items, self.alpha, self.panel_px = max_items, alpha, int(panel_px)

    def on_batch(self, trainer, pl_module, outputs, batch, dataloader_idx: int, stage: str) -> None:
        if batch.get("role") == "calib":
            return
        if batch.get("partition", stage) != stage:  # a test run's lambda-selection (validation) sets
            return
        if not isinstance(outputs, dict) or "cam" not in outputs:
            return
        split = batch.get("split", "?")
        done = sum(r["split"] == split for r in self.records)
        take = min(self.max_items - done, outputs["cam"].shape[0])
        if take <= 0:
            return
        out_dir = self.stage_dir(trainer, stage)
        images = batch["image"][:take].detach().float().cpu()
        index = batch.get("index", torch.arange(take))
        class_names = _class_names(pl_module, batch)
        for i in range(take):
            item = str(int(index[i]))
            stem = f"{stage}_{split}_{item}"
            pred = int(outputs["pred_class"][i])
            text = f"{class_names[pred]} (predicted ID class)" if class_names else f"ID class {pred}"
            title = explanation_title(text, "NegAlign CAM (Grad-CAM at ln_1)", item, f"{stage} / {split}")
            cam = outputs["cam"][i]
            bg = background_view(images[i], outputs["fg_mask"][i])
            panel = figure_to_array(
                explanation_figure(
                    images[i],
                    cam.numpy(),
                    title,
                    alpha=self.alpha,
                    extra_panels=[("background pooled (foreground dimmed)", bg)],
                    panel_px=self.panel_px,
                )
            )
            png = save_png(panel, out_dir / f"{stem}.png", text={"Title": title})
            npy, _ = save_map_npy(
                cam.numpy(),
                out_dir / f"{stem}.npy",
                image_size=tuple(images.shape[-2:]),
                extra={"text": text, "explainer": "negalign_cam", "item_id": item, "split": split, "title": title},
            )
            self.log_image(trainer, stage, "cam", f"{split}_{item}", panel)
            self.records.append(
                {
                    "split": split,
                    "id": item,
                    "stage": stage,
                    "png": png.name,
                    "npy": npy.name,
                    "title": title,
                    "cam_valid": bool(outputs["cam_valid"][i]),
                    "pred_class": pred,
                    "map_max": float(cam.max()),
                    "all_zero": bool(cam.max() <= 0),
                    "foreground_patches": int(outputs["fg_mask"][i].sum()),
                }
            )


def _class_names(pl_module, batch) -> list[str]:
    """The ID class names of the module that scored `batch` (a suite's routed member, or itself)."""
    pick = getattr(pl_module, "member_for", None)
    module = pick(batch) if pick is not None else pl_module
    return list(getattr(module, "class_names", []) or [])
