"""`CIRDataModule`: a CIR benchmark (ShapesWorld, CIRR, CIRCO, FashionIQ) for validate/test, and
ShapesWorld images with their concepts for training phi.

validate/test batches come from two loaders (one per kind, ``task`` tags them):
- ``cir_gallery``: ``{"image" [B,3,S,S] in [0,1], "index" [B] gallery indices}`` (or index-only
  batches with ``"cached": True`` when the module holds the gallery's embeddings);
- ``cir_query``: ``{"reference" [B,3,S,S], "captions" [B] tuples of 1 or 2 strings, "index" [B]
  query indices}``.
Unreadable image files are dropped from their batch and reported (``skipped``, ``skipped_index``,
``skipped_paths``; see `xclip.data.image_folder.collate_skipping`). fit batches (phi training):
``{"index" [B] training-image indices, "concepts" [B] lists of concept names}``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from xclip.cir.benchmark import CIRBenchmark, ShapesCIRBenchmark
from xclip.cir.concepts import scene_concepts
from xclip.cir.loaders import (
    FASHIONIQ_CATEGORIES,
    load_circo,
    load_cirr,
    load_fashioniq,
)
from xclip.data.image_folder import collate_skipping, unreadable_item
from xclip.data.sampling import IndexDataset, eval_loader
from xclip.data.shapes import ShapesCaptions

SOURCES = ("shapes", "cirr", "circo", "fashioniq")


class GalleryImages(Dataset):
    """The gallery of a benchmark: ``{"image", "index"}`` items (or an unreadable item)."""

    def __init__(self, benchmark: CIRBenchmark):
        self.benchmark = benchmark

    def __len__(self) -> int:
        return self.benchmark.n_gallery

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.benchmark.gallery_image(index)
        if image is None:
            return unreadable_item(index, self.benchmark.gallery_path(index))
        return {"image": image, "index": index}


class QueryItems(Dataset):
    """The queries of a benchmark: ``{"reference", "captions", "index"}`` (or an unreadable item)."""

    def __init__(self, benchmark: CIRBenchmark):
        self.benchmark = benchmark

    def __len__(self) -> int:
        return len(self.benchmark)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.benchmark.reference_image(index)
        if image is None:
            return unreadable_item(index, self.benchmark.reference_path(index))
        return {"reference": image, "captions": self.benchmark.queries[index].captions, "index": index}


class PhiTrainingImages(Dataset):
    """ShapesWorld scenes (``ShapesCaptions``, train split) with their concepts, for phi.

    ``image(i)`` renders image i (the module embeds all images once, before training);
    items are ``{"index", "concepts"}``.
    """

    def __init__(
        self, n: int = 2000, seed: int = 0, image_size: int = 64, max_objects: int = 3, concept_kind: str = "shape"
    ):
        self.scenes = ShapesCaptions(
            n=n, seed=seed, image_size=image_size, max_objects=max_objects, captions_per_image=1, split="train"
        )
        self.concept_kind = concept_kind
        self._concepts = [scene_concepts(self.scenes.sample(i).scene, concept_kind) for i in range(n)]

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, index: int) -> torch.Tensor:
        return self.scenes[index]["image"]

    def concepts(self, index: int) -> list[str]:
        return list(self._concepts[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "concepts": self.concepts(index)}


def _collate(task: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    captions = [it.pop("captions") for it in items if "captions" in it]
    batch = collate_skipping(items)
    if captions:
        batch["captions"] = captions
    batch["task"] = task
    return batch


def collate_gallery(items: list[dict[str, Any]]) -> dict[str, Any]:
    return _collate("cir_gallery", items)


def collate_queries(items: list[dict[str, Any]]) -> dict[str, Any]:
    return _collate("cir_query", items)


def collate_cached(indices: list[int]) -> dict[str, Any]:
    return {"index": torch.tensor(indices, dtype=torch.long), "task": "cir_gallery", "cached": True}


def collate_training(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "concepts": [it["concepts"] for it in items],
        "task": "phi",
    }


class CIRDataModule(pl.LightningDataModule):
    """A CIR benchmark for validate/test (and ShapesWorld training images for phi).

    ``validate`` serves the validation split, ``test`` the held-out one: ShapesWorld's test key
    family (disjoint from every validation sample), CIRR ``test1`` and CIRCO ``test`` (targets
    hidden: the module writes submission files), FashionIQ ``test_split``.

    Args:
        source: ``shapes`` | ``cirr`` | ``circo`` | ``fashioniq``.
        data_root: the dataset folder (not for shapes).
        n: ShapesWorld single-edit queries per split (6 per reference set: the gallery holds 7 images
            per set; see `ShapesCIRBenchmark`).
        n_circo: ShapesWorld CIRCO-style queries per split (each plants 5 gallery images).
        seed: the base seed, as in every ShapesWorld datamodule: the evaluation queries use
            ``seed + 1000`` (the test split in its own key family), phi's training images ``seed``.
        image_size: image side S (ShapesWorld render size; files: shorter side resized, centre crop).
        val_split, test_split: the dataset's split names (defaults per source).
        categories: FashionIQ categories.
        n_train, train_max_objects: phi training images (ShapesCaptions, train split).
        concept_kind: ShapesWorld concepts of the training images (``shape`` or ``object``,
            see `xclip.cir.concepts`).
        pad_ratio: files only: SEARLE's target pad (1.25); None for CLIP's plain resize + crop.
        batch_size, num_workers: loader settings.
    """

    def __init__(
        self,
        source: str = "shapes",
        data_root: str | None = None,
        n: int = 600,
        seed: int = 0,
        image_size: int = 64,
        val_split: str | None = None,
        test_split: str | None = None,
        categories: list[str] | None = None,
        n_train: int = 2000,
        train_max_objects: int = 3,
        concept_kind: str = "shape",
        pad_ratio: float | None = 1.25,
        batch_size: int = 128,
        num_workers: int = 0,
        n_circo: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown CIR source {source!r}; choose from {SOURCES}")
        if source != "shapes" and not data_root:
            raise ValueError(f"source={source!r} needs data_root (the dataset folder)")
        defaults = {
            "shapes": ("val", "test"),
            "cirr": ("val", "test1"),
            "circo": ("val", "test"),
            "fashioniq": ("val", "test"),
        }[source]
        self.source, self.data_root, self.n, self.seed, self.image_size = source, data_root, n, seed, image_size
        self.n_circo = n_circo
        self.val_split, self.test_split = val_split or defaults[0], test_split or defaults[1]
        self.categories = list(categories or FASHIONIQ_CATEGORIES)
        self.n_train, self.train_max_objects = n_train, train_max_objects
        self.concept_kind, self.pad_ratio = concept_kind, pad_ratio
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skip_gallery_images = False
        self.stage_split = "val"
        self._benchmarks: dict[str, CIRBenchmark] = {}
        self._training: PhiTrainingImages | None = None

    @property
    def benchmark(self) -> CIRBenchmark:
        """The benchmark of the current stage (``val`` unless `setup` ran for test)."""
        return self.benchmark_for(self.stage_split)

    def benchmark_for(self, split: str) -> CIRBenchmark:
        """The ``val`` or ``test`` benchmark (built on first use; annotation errors surface here)."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        if split not in self._benchmarks:
            name = self.val_split if split == "val" else self.test_split
            root = str(self.data_root)  # checked in __init__ for every file source
            bench: CIRBenchmark
            if self.source == "shapes":
                bench = ShapesCIRBenchmark(self.n, self.seed + 1000, self.image_size, split=split, n_circo=self.n_circo)
            elif self.source == "cirr":
                bench = load_cirr(root, name, self.image_size, pad_ratio=self.pad_ratio)
            elif self.source == "circo":
                bench = load_circo(root, name, self.image_size, pad_ratio=self.pad_ratio)
            else:
                bench = load_fashioniq(root, name, self.categories, self.image_size, pad_ratio=self.pad_ratio)
            self._benchmarks[split] = bench
        return self._benchmarks[split]

    @property
    def training_images(self) -> PhiTrainingImages:
        if self._training is None:
            self._training = PhiTrainingImages(
                self.n_train, self.seed, self.image_size, self.train_max_objects, self.concept_kind
            )
        return self._training

    def setup(self, stage: str) -> None:
        self.stage_split = "test" if stage == "test" else "val"
        if stage in ("validate", "test", "fit"):
            self.benchmark  # noqa: B018 - fail on bad annotations before any model work

    def _eval_loaders(self) -> list[DataLoader]:
        bench = self.benchmark
        if self.skip_gallery_images:
            gallery = eval_loader(IndexDataset(bench.n_gallery), self.batch_size, collate_cached)
        else:
            gallery = eval_loader(GalleryImages(bench), self.batch_size, collate_gallery, self.num_workers)
        queries = eval_loader(QueryItems(bench), self.batch_size, collate_queries, self.num_workers)
        return [gallery, queries]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def train_dataloader(self) -> DataLoader:
        if self.source != "shapes":
            raise ValueError("phi is trained on ShapesWorld images here: use source 'shapes' for `xclip fit`")
        return DataLoader(
            self.training_images,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate_training,
        )
