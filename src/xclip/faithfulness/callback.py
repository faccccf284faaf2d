"""`TiPAIFiguresCallback`: one comparison figure per prompt (its images sorted by global score,
chosen and rejected marked, every patch map as a red-yellow-green heatmap / overlay) for the first
`max_prompts` prompts of a validate/test run, to TensorBoard (``tipai/<stage>/<prompt_id>``) and as
PNG under ``<log dir>/<subdir>/``, with an index JSON. The maps drawn are those the module scored
and stored, so nothing is recomputed."""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl

from xclip.explain.render import explanation_title, figure_to_array, save_png
from xclip.faithfulness.figures import prompt_figure
from xclip.io import atomic_write_text
from xclip.results import run_directory


class TiPAIFiguresCallback(pl.Callback):
    """Args: max_prompts: prompts drawn per run; alpha: overlay opacity; subdir: folder under the
    log directory."""

    def __init__(self, max_prompts: int = 8, alpha: float = 0.5, subdir: str = "explanations/tipai"):
        if max_prompts < 0:
            raise ValueError("max_prompts must be >= 0")
        self.max_prompts, self.alpha, self.subdir = max_prompts, alpha, subdir
        self._records: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._records = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._draw(trainer, outputs, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._draw(trainer, outputs, "test")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write_index(trainer, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write_index(trainer, "test")

    def _draw(self, trainer, outputs, stage: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(outputs, dict) or "maps" not in outputs:
            return
        out_dir = run_directory(trainer) / self.subdir
        experiments = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
        chosen = {int(c) for c, _ in outputs["pairs"].tolist()}
        rejected = {int(r) for _, r in outputs["pairs"].tolist()}
        for b, pid in enumerate(outputs["prompt_id"]):
            if len(self._records) >= self.max_prompts:
                return
            rows = (outputs["prompt_of"] == b).nonzero().flatten()
            if rows.numel() == 0:
                continue
            roles = ["chosen" if int(i) in chosen else "rejected" if int(i) in rejected else "" for i in rows]
            labels = ["seed " + outputs["image_id"][int(i)].rsplit("_", 1)[-1]
                      + (f", {outputs['error'][int(i)]}" if outputs["error"][int(i)] else "") for i in rows]
            title = explanation_title(outputs["prompt"][b], "TiPAI " + ", ".join(outputs["maps"]), pid, stage)
            fig = prompt_figure(outputs["prompt"][b], outputs["images"][rows], outputs["global"][rows],
                                {k: v[rows] for k, v in outputs["maps"].items()}, roles, labels, title, alpha=self.alpha)
            array = figure_to_array(fig)
            png = save_png(array, out_dir / f"{stage}_{pid}.png", text={"Title": title})
            for exp in experiments:
                exp.add_image(f"tipai/{stage}/{pid}", array, trainer.global_step, dataformats="HWC")
            self._records.append({"prompt_id": pid, "prompt": outputs["prompt"][b], "png": png.name, "title": title,
                                  "images": [outputs["image_id"][int(i)] for i in rows], "roles": roles,
                                  "global": [float(outputs["global"][int(i)]) for i in rows]})

    def _write_index(self, trainer, stage: str) -> None:
        if not self._records or not trainer.is_global_zero:
            return
        atomic_write_text(run_directory(trainer) / self.subdir / f"{stage}_index.json",
                          json.dumps({"stage": stage, "items": self._records}, indent=2))
