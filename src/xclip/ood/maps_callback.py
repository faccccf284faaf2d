"""NegAlign CAM maps of a few ID and OOD images: image | CAM overlay | background region.

The maps are the ones the module scored with (``NegAlignModule.ood_step`` returns them), so
nothing is recomputed. Per split, the first `max_per_split` images go to TensorBoard
(``negalign_maps/<stage>/<split>/<index>``) and to ``<log dir>/<subdir>/`` as PNG (titled with
the explained class, the explainer and the item, with a colour bar and the CAM's raw maximum) plus
the raw CAM as NPY (patch grid) with its JSON sidecar, and an index JSON per stage.
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from xclip.explain.render import explanation_figure, explanation_title, figure_to_array, save_map_npy, save_png
from xclip.io import atomic_write_text
from xclip.results import run_directory


def background_view(image01: torch.Tensor, fg_mask: torch.Tensor, dim: float = 0.25) -> np.ndarray:
    """uint8 [H, W, 3]: the image with its CAM foreground patches (`fg_mask` [gh, gw]) dimmed to
    `dim`, so what remains bright is the region pooled into the background embedding."""
    fg = F.interpolate(fg_mask[None, None].float(), size=image01.shape[-2:], mode="nearest")[0]
    shown = image01 * (1 - (1 - dim) * fg)
    return (shown.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


class NegAlignMapsCallback(pl.Callback):
    """Log NegAlign's CAM foreground/background for the first `max_per_split` images of each split.

    Args:
        max_per_split: images per split (ID, each OOD set; calibration is skipped).
        alpha: CAM overlay opacity.
        panel_px: side of each panel of the PNG / TensorBoard images.
        subdir: folder under the log directory.
    """

    def __init__(self, max_per_split: int = 4, alpha: float = 0.5, panel_px: int = 192,
                 subdir: str = "explanations/negalign"):
        if max_per_split < 0:
            raise ValueError("max_per_split must be >= 0")
        self.max_per_split, self.alpha = max_per_split, alpha
        self.panel_px, self.subdir = int(panel_px), subdir
        self._records: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._records = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log_batch(trainer, pl_module, outputs, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log_batch(trainer, pl_module, outputs, batch, "test")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write_index(trainer, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write_index(trainer, "test")

    def _log_batch(self, trainer, pl_module, outputs, batch, stage: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or batch.get("role") == "calib":
            return
        if batch.get("partition", stage) != stage:  # a test run's lambda-selection (validation) sets
            return
        if not isinstance(outputs, dict) or "cam" not in outputs:
            return
        split = batch.get("split", "?")
        done = sum(r["split"] == split for r in self._records)
        take = min(self.max_per_split - done, outputs["cam"].shape[0])
        if take <= 0:
            return
        out_dir = run_directory(trainer) / self.subdir
        experiments = [lg.experiment for lg in trainer.loggers
                       if hasattr(getattr(lg, "experiment", None), "add_image")]
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
            panel = figure_to_array(explanation_figure(images[i], cam.numpy(), title, alpha=self.alpha,
                                                       extra_panels=[("background pooled (foreground dimmed)", bg)],
                                                       panel_px=self.panel_px))
            png = save_png(panel, out_dir / f"{stem}.png", text={"Title": title})
            npy, _ = save_map_npy(cam.numpy(), out_dir / f"{stem}.npy", image_size=tuple(images.shape[-2:]),
                                  extra={"text": text, "explainer": "negalign_cam", "item_id": item, "split": split,
                                         "title": title})
            for exp in experiments:
                exp.add_image(f"negalign_maps/{stage}/{split}/{item}", panel, trainer.global_step, dataformats="HWC")
            self._records.append({"split": split, "id": item, "stage": stage, "png": png.name, "npy": npy.name,
                                  "title": title, "cam_valid": bool(outputs["cam_valid"][i]), "pred_class": pred,
                                  "map_max": float(cam.max()), "all_zero": bool(cam.max() <= 0),
                                  "foreground_patches": int(outputs["fg_mask"][i].sum())})

    def _write_index(self, trainer, stage: str) -> None:
        if not self._records or not trainer.is_global_zero:
            return
        out_dir = run_directory(trainer) / self.subdir
        payload = {"stage": stage, "items": self._records}
        atomic_write_text(out_dir / f"{stage}_index.json", json.dumps(payload, indent=2))


def _class_names(pl_module, batch) -> list[str]:
    """The ID class names of the module that scored `batch` (a suite's routed member, or itself)."""
    pick = getattr(pl_module, "member_for", None)
    module = pick(batch) if pick is not None else pl_module
    return list(getattr(module, "class_names", []) or [])
