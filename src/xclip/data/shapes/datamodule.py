"""`ShapesWorldDataModule`: the ShapesWorld datasets of the zero-shot, retrieval, OOD and pretraining
workflows (the modules of the demo suite) behind one LightningDataModule, each batch tagged with its
task. CIR, faithfulness and distillation batches have schemas of their own and come from their
workflow's datamodule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from xclip.data.sampling import eval_loader
from xclip.data.shapes.datasets import (
    ShapesCaptions,
    ShapesClassification,
    ShapesPretrain,
    SpuriousShapes,
    _Sized,
)

TASKS: dict[str, type[_Sized]] = {
    "retrieval": ShapesCaptions,
    "classification": ShapesClassification,
    "spurious": SpuriousShapes,
    "pretrain": ShapesPretrain,
}

# workflows whose ShapesWorld batches come from their own datamodule (one schema per task tag)
OWN_DATAMODULES = {
    "cir": "xclip.cir.CIRDataModule",
    "faithfulness": "xclip.faithfulness.TiPAIDataModule",
    "multimodal": "xclip.distill.DistillDataModule",
}


def collate_captions(items: list[dict]) -> dict:
    """Images [B,3,S,S]; every caption flattened into ``texts`` [T] with ``text_to_image`` [T]
    (the caption's image position in the batch); ``index`` [B] dataset indices."""
    texts, owner = [], []
    for b, item in enumerate(items):
        texts.extend(item["captions"])
        owner.extend([b] * len(item["captions"]))
    return {
        "image": torch.stack([it["image"] for it in items]),
        "texts": texts,
        "text_to_image": torch.tensor(owner, dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def collate_pretrain(items: list[dict]) -> dict:
    """Flatten each item's (scene, hard negative) pair into one batch of 2B images and captions."""
    return {
        "image": torch.cat([it["image"] for it in items]),
        "texts": [c for it in items for c in it["captions"]],
    }


_COLLATES = {"retrieval": collate_captions, "pretrain": collate_pretrain}


class _Tagged:
    """Collate wrapper adding ``batch["task"]`` so one module can serve several val loaders."""

    def __init__(self, task: str):
        self.task, self.fn = task, _COLLATES.get(task, default_collate)

    def __call__(self, items: list[dict]) -> dict:
        batch = self.fn(items)
        batch["task"] = self.task
        return batch


class ShapesWorldDataModule(pl.LightningDataModule):
    """ShapesWorld for any workflow.

    Args:
        val_tasks: datasets for validate/test, one dataloader each, in order
            (``retrieval``, ``classification``, ``spurious``).
        train_task: the dataset for fit (``pretrain`` for the tiny CLIP), or None.
        image_size: render resolution (any size; 64 is the tiny checkpoint's).
        seed: training seed; validation sets use ``seed + 1000`` so they never share a sample
            stream with training; test sets use ``seed + 1000`` in the test key family of
            :func:`~xclip.data.shapes.generator.sample_rng`, disjoint from both.
        n_train: training set size.
        n_val: validation set size.
        n_test: test set size (None: ``n_val``).
        task_options: extra constructor arguments per task, e.g. ``{"spurious": {"ood": "background"}}``.
    """

    def __init__(
        self,
        val_tasks: list[str] | None = None,
        train_task: str | None = None,
        image_size: int = 64,
        seed: int = 0,
        n_train: int = 100_000,
        n_val: int = 1000,
        n_test: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        task_options: dict[str, dict[str, Any]] | None = None,
    ):
        super().__init__()
        self.val_tasks = list(val_tasks if val_tasks is not None else ["classification", "retrieval"])
        for task in self.val_tasks + ([train_task] if train_task else []):
            if task in OWN_DATAMODULES:
                raise ValueError(
                    f"ShapesWorld task {task!r} has a batch schema of its own: use "
                    f"{OWN_DATAMODULES[task]} instead of ShapesWorldDataModule"
                )
            if task not in TASKS:
                raise ValueError(f"unknown ShapesWorld task {task!r}; choose from {sorted(TASKS)}")
        self.train_task, self.image_size, self.seed = train_task, image_size, seed
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_val if n_test is None else n_test
        self.batch_size, self.num_workers = batch_size, num_workers
        self.task_options = task_options or {}

    def dataset(self, task: str, split: str = "val") -> Dataset:
        """The dataset of `task` for ``split`` (``train``, ``val`` or ``test``)."""
        n, seed = {
            "train": (self.n_train, self.seed),
            "val": (self.n_val, self.seed + 1000),
            "test": (self.n_test, self.seed + 1000),
        }[split]
        return TASKS[task](n=n, seed=seed, image_size=self.image_size, split=split, **self.task_options.get(task, {}))

    def _loader(self, task: str, split: str) -> DataLoader:
        # Pretraining pairs are flattened two per item, so halve the item count per batch.
        batch = self.batch_size // 2 if task == "pretrain" else self.batch_size
        if split != "train":  # whole batches per process under DDP: the single-process numbers
            return eval_loader(self.dataset(task, split), batch, _Tagged(task), self.num_workers)
        return DataLoader(
            self.dataset(task, split),
            batch_size=batch,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=_Tagged(task),
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_task is None:
            raise ValueError("ShapesWorldDataModule.train_task is not set: name the dataset to fit on (e.g. pretrain)")
        return self._loader(self.train_task, "train")

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(t, "val") for t in self.val_tasks]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(t, "test") for t in self.val_tasks]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
