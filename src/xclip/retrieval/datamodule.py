"""`RetrievalDataModule`: one caption gallery (ShapesWorld, COCO captions or a Karpathy split)
served as ``retrieval`` batches in gallery order."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from xclip.data.sampling import IndexDataset, eval_loader
from xclip.data.shapes.datamodule import collate_captions
from xclip.retrieval.coco import load_coco_captions, load_karpathy
from xclip.retrieval.gallery import CaptionGallery, ShapesGallery

SOURCES = ("shapes", "coco", "karpathy")


class RetrievalDataModule(pl.LightningDataModule):
    """A retrieval gallery for validate/test. Batches: ``{"image" [B,3,S,S] in [0,1], "texts"
    [T], "text_to_image" [T] (position in the batch), "index" [B] (gallery index), "task":
    "retrieval"}``; the gallery itself is ``.gallery``.

    ``validate`` serves the validation gallery and ``test`` the held-out one: ShapesWorld's test
    key family (disjoint from every validation sample), the Karpathy ``test_split``. COCO's
    ``captions_val2017.json`` has no held-out split, so ``test`` with ``source: coco`` is an error.

    When a module already holds the gallery's embeddings (an embedding cache hit) it sets
    ``skip_images = True``; the loader then yields index-only batches (``"cached": True``) and no
    image is read or decoded.

    Args:
        source: ``shapes`` | ``coco`` | ``karpathy``.
        n: gallery size (shapes), or the seeded subset size (coco, karpathy; None = all).
        seed: the base seed: ShapesWorld galleries use ``seed + 1000`` (the test gallery in the
            disjoint test key family); coco / karpathy draw their subset with it.
        image_size: side of the square images (resized shorter side + centre crop for files).
        data_root: coco: the COCO directory; karpathy: the directory ``filepath/filename`` is under.
        annotations: relative to `data_root`; default ``annotations/captions_val2017.json`` (coco),
            ``dataset_coco.json`` (karpathy).
        images: coco: the image directory under `data_root` (default ``val2017``).
        val_split, test_split: karpathy: the splits of validate and test (``val`` / ``test``; also
            ``train`` | ``restval``).
        max_objects, captions_per_image: shapes only.
    """

    def __init__(
        self,
        source: str = "shapes",
        n: int | None = 1000,
        seed: int = 0,
        image_size: int = 64,
        data_root: str | None = None,
        annotations: str | None = None,
        images: str = "val2017",
        val_split: str = "val",
        test_split: str = "test",
        max_objects: int = 3,
        captions_per_image: int = 2,
        batch_size: int = 128,
        num_workers: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown retrieval source {source!r}; choose from {SOURCES}")
        if source != "shapes" and not data_root:
            raise ValueError(f"source={source!r} needs data_root (the directory holding the images and annotations)")
        if source == "shapes" and n is None:
            raise ValueError("source='shapes' needs a gallery size n")
        self.source, self.n, self.seed, self.image_size = source, n, seed, image_size
        self.data_root, self.annotations, self.images = data_root, annotations, images
        self.val_split, self.test_split = val_split, test_split
        self.max_objects, self.captions_per_image = max_objects, captions_per_image
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skip_images = False
        self.stage_split = "val"  # which gallery `gallery` is: set by `setup` ("test" under xclip test)
        self._galleries: dict[str, CaptionGallery] = {}

    @property
    def gallery(self) -> CaptionGallery:
        """The gallery of the current stage (built on first use; annotation problems surface here)."""
        return self.gallery_for(self.stage_split)

    def gallery_for(self, split: str) -> CaptionGallery:
        """The ``val`` or ``test`` gallery."""
        if split not in self._galleries:
            self._galleries[split] = self._build(split)
        return self._galleries[split]

    def _build(self, split: str) -> CaptionGallery:
        if self.source == "shapes":
            assert self.n is not None  # __init__ refuses shapes without n
            return ShapesGallery(
                n=self.n,
                seed=self.seed + 1000,
                image_size=self.image_size,
                max_objects=self.max_objects,
                captions_per_image=self.captions_per_image,
                split=split,
            )
        assert self.data_root is not None  # __init__ refuses coco / karpathy without data_root
        if self.source == "coco":
            if split == "test":
                raise ValueError(
                    "source 'coco' reads captions_val2017.json, which has no held-out test split: "
                    "run `xclip validate` on it, or use source 'karpathy' (test_split: test) for `xclip test`"
                )
            return load_coco_captions(
                self.data_root,
                self.annotations or "annotations/captions_val2017.json",
                self.images,
                self.n,
                self.seed,
                self.image_size,
            )
        return load_karpathy(
            self.data_root,
            self.annotations or "dataset_coco.json",
            self.test_split if split == "test" else self.val_split,
            self.n,
            self.seed,
            self.image_size,
        )

    def setup(self, stage: str) -> None:
        self.stage_split = "test" if stage == "test" else "val"
        self.gallery  # noqa: B018 - fail on bad annotations before any model work

    def val_dataloader(self) -> DataLoader:
        if self.skip_images:
            return eval_loader(IndexDataset(len(self.gallery)), self.batch_size, _collate_cached)
        return eval_loader(self.gallery, self.batch_size, _collate_retrieval, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _collate_retrieval(items: list[dict]) -> dict:
    return {**collate_captions(items), "task": "retrieval"}


def _collate_cached(indices: list[int]) -> dict:
    return {"index": torch.tensor(indices, dtype=torch.long), "task": "retrieval", "cached": True}
