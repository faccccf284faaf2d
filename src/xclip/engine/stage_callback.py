"""`StageCallback`: the base of every callback that writes per-item files during validate/test.

It owns what such callbacks share: the val/test hook pairs (turned into ``start`` / ``on_batch`` /
``end`` with the stage as an argument, skipped during the sanity check and on ranks other than 0),
one folder per stage (``<run dir>/<subdir>/<stage>/``) with one index file
(``<run dir>/<subdir>/<stage>/index.json``: the stage, the callback's own keys and one record per
item), and one TensorBoard tag scheme, ``{stage}/{workflow}/{what}/{item}``.

``end`` runs at ``on_validation_end`` / ``on_test_end``, after the module's epoch end, so a
callback can read what the module computed over the whole epoch (failures, gathered embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np

from xclip.io import atomic_write_text
from xclip.results import run_directory


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter``-like experiments of the trainer's loggers (those that take images)."""
    experiments = (getattr(lg, "experiment", None) for lg in trainer.loggers)  # not every Logger has one
    return [ex for ex in experiments if hasattr(ex, "add_image")]


class StageCallback(pl.Callback):
    """Per-item outputs of validate/test (see the module docstring).

    Class attributes:
        workflow: the second part of the TensorBoard tags (``{stage}/{workflow}/...``).
        write_empty_index: write the index also when no item was written (a summary still matters).

    Args:
        subdir: folder under the run directory; each stage writes into ``<subdir>/<stage>/``.
    """

    workflow: ClassVar[str] = ""
    write_empty_index: ClassVar[bool] = False  # write index.json also when no item was written

    def __init__(self, subdir: str) -> None:
        self.subdir = subdir
        self.records: list[dict[str, Any]] = []

    # ---- what a callback writes -------------------------------------------------------------------
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start of a validate/test epoch (after `records` was emptied)."""

    def on_batch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        dataloader_idx: int,
        stage: str,
    ) -> None:
        """After each batch's step, on rank 0, outside the sanity check."""

    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After the module's epoch end (default: write the index)."""
        self.write_index(trainer, stage)

    def index_payload(self, trainer: pl.Trainer, stage: str) -> dict[str, Any]:
        """The callback's own keys of the index file (beside ``stage`` and ``items``)."""
        return {}

    # ---- shared pieces ------------------------------------------------------------------------------
    def stage_dir(self, trainer: pl.Trainer, stage: str) -> Path:
        return run_directory(trainer) / self.subdir / stage

    def index_path(self, trainer: pl.Trainer, stage: str) -> Path:
        return self.stage_dir(trainer, stage) / "index.json"

    def write_index(self, trainer: pl.Trainer, stage: str) -> Path | None:
        """Write ``<subdir>/<stage>/index.json`` atomically (nothing when no item was written, unless
        `write_empty_index`)."""
        if not (self.records or self.write_empty_index) or not trainer.is_global_zero:
            return None
        payload = {"stage": stage, **self.index_payload(trainer, stage), "items": self.records}
        return atomic_write_text(self.index_path(trainer, stage), json.dumps(payload, indent=2, default=str))

    def tag(self, stage: str, what: str, item: str) -> str:
        """``{stage}/{workflow}/{what}/{item}``: the one TensorBoard tag scheme."""
        return f"{stage}/{self.workflow}/{what}/{item}"

    def log_image(self, trainer: pl.Trainer, stage: str, what: str, item: str, image: np.ndarray) -> None:
        """Log an ``[H, W, 3]`` uint8 image to every TensorBoard logger under `tag`."""
        for writer in tensorboard_writers(trainer):
            writer.add_image(self.tag(stage, what, item), image, trainer.global_step, dataformats="HWC")

    @staticmethod
    def active(trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.is_global_zero

    # ---- Lightning's hooks, written once --------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.records = []
        self.start(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.active(trainer):
            self.on_batch(trainer, pl_module, outputs, batch, dataloader_idx, "val")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.active(trainer):
            self.on_batch(trainer, pl_module, outputs, batch, dataloader_idx, "test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.end(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end(trainer, pl_module, "test")
