"""`TSPOFeatureDataModule`: frozen CLIP features of ShapesWorld faithfulness prompts, computed once
and cached on disk, so training epochs never run the backbone.

Per split (train: the training stream; val: seed + 1000; test: the disjoint test key family), for
each prompt and each of its R renderings: the head's features (`tspo_head.HeadFeatures`), whether
the rendering is faithful, and its patch target (the error mask mean-pooled per ViT patch,
binarised at > 0). On request (``crop_splits``) also the crop heatmap on the patch grid (TiPAI
``crops`` with G = the ViT grid: one crop per patch), the baseline the head is measured against.

Batches hold B prompts: ``text`` [B, D], ``image`` [B, R, D], ``tokens`` [B, R, P, W],
``patch_sim`` [B, R, P], ``faithful`` [B, R], ``patch_target`` [B, R, P], ``index`` [B] and, when
cached, ``crops`` [B, R, P].
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader

from xclip.backbones import Backbone, resolve_backbone
from xclip.data.embedding_cache import weights_fingerprint
from xclip.data.sampling import IndexDataset, eval_loader
from xclip.data.shapes import ShapesFaithfulness
from xclip.faithfulness.grid import cell_means
from xclip.faithfulness.scoring import TiPAIScorer
from xclip.faithfulness.tspo_head import extract_features
from xclip.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class _Collate:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.tensor(indices, dtype=torch.long)
        batch: dict[str, Any] = {
            k: (v[idx].float() if v.is_floating_point() else v[idx]) for k, v in self.tensors.items()
        }
        batch["index"] = idx
        batch["task"] = "tspo"
        return batch


class TSPOFeatureDataModule(pl.LightningDataModule):
    """Cached frozen features of ShapesWorld faithfulness prompts for ``TSPOHeadModule``.

    Args:
        backbone: the frozen CLIP (spec or `Backbone`).
        n_train, n_val, n_test: prompts per split.
        seed: training seed (validation uses seed + 1000; test the test key family of seed + 1000).
        n_renderings, image_size: ShapesWorld faithfulness set options.
        crop_splits: splits that also get the crop heatmap baseline (G*G crop forwards per image:
            slow; the held-out split is enough).
        cache_dir: where features are cached (keyed by model weights, split, sizes); None: memory only.
        batch_size: prompts per batch; extract_batch_size: images per backbone forward.
    """

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        n_train: int = 2000,
        n_val: int = 200,
        n_test: int = 200,
        seed: int = 0,
        n_renderings: int = 4,
        image_size: int = 64,
        crop_splits: tuple[str, ...] = ("test",),
        cache_dir: str | None = "runs/tspo_cache",
        batch_size: int = 64,
        extract_batch_size: int = 256,
        num_workers: int = 0,
    ):
        super().__init__()
        unknown = sorted(set(crop_splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"crop_splits must be among {SPLITS}, got {unknown}")
        self.backbone, self.backbone_spec = resolve_backbone(backbone)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.seed, self.n_renderings, self.image_size = seed, n_renderings, image_size
        self.crop_splits, self.cache_dir = tuple(crop_splits), cache_dir
        self.batch_size, self.extract_batch_size, self.num_workers = batch_size, extract_batch_size, num_workers
        self.features: dict[str, dict[str, torch.Tensor]] = {}
        self.extracted: dict[str, str] = {}  # split -> "cache hit" / "computed"

    def dataset(self, split: str) -> ShapesFaithfulness:
        """The ShapesWorld faithfulness set of `split` (its images are what the features describe)."""
        seed = self.seed if split == "train" else self.seed + 1000
        return ShapesFaithfulness(
            n=self.sizes[split], seed=seed, image_size=self.image_size, n_renderings=self.n_renderings, split=split
        )

    def cache_key(self, split: str) -> dict[str, Any]:
        return {
            "backbone": self.backbone_spec,
            "weights_sha256": weights_fingerprint(self.backbone),
            "split": split,
            "n": self.sizes[split],
            "seed": self.seed,
            "n_renderings": self.n_renderings,
            "image_size": self.image_size,
            "crops": split in self.crop_splits,
            "format": 1,
        }

    def setup(self, stage: str) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, SPLITS)
        for split in splits:
            if split not in self.features:
                self.features[split] = self._load_or_extract(split)

    def _load_or_extract(self, split: str) -> dict[str, torch.Tensor]:
        key = self.cache_key(split)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        file = Path(self.cache_dir) / f"tspo_{split}_{digest}.safetensors" if self.cache_dir else None
        if file is not None and file.is_file():
            self.extracted[split] = "cache hit"
            return load_file(str(file))
        log.info("extracting TSPO features of %d %s prompts (once; cached at %s)", self.sizes[split], split, file)
        tensors = self.extract(split)
        if file is not None:
            atomic_write_bytes(file, save(tensors, metadata={"key": json.dumps(key, sort_keys=True)}))
            atomic_write_text(file.with_suffix(".json"), json.dumps(key, indent=2) + "\n")
        self.extracted[split] = "computed"
        return tensors

    def extract(self, split: str) -> dict[str, torch.Tensor]:
        """Run the backbone once over a split: the tensors listed in the module docstring."""
        data = self.dataset(split)
        bb = self.backbone
        gh, gw = bb.grid_size
        prompts, images, masks, faithful = [], [], [], []
        for i in range(len(data)):  # rendering ShapesWorld scenes, no model calls
            item = data[i]
            prompts.append(item["prompt"])
            images.append(item["images"])
            masks.append(item["error_masks"])
            faithful.append(item["faithful"])
        images_t = torch.cat(images)
        n, r = len(prompts), self.n_renderings
        with torch.no_grad():
            text = bb.encode_texts(prompts, normalize=True).float().cpu()
        per_image_text = text.repeat_interleave(r, 0)
        feats = extract_features(bb, images_t, per_image_text, self.extract_batch_size)
        target = cell_means(torch.cat(masks).float(), gh) > 0 if gh == gw else None
        if target is None:
            raise ValueError(f"TSPO features need a square patch grid, got {(gh, gw)}")
        out = {
            "text": text,
            "image": feats.image.view(n, r, -1),
            "tokens": feats.tokens.half().view(n, r, gh * gw, -1),
            "patch_sim": feats.patch_sim.view(n, r, -1),
            "faithful": torch.stack(faithful).to(torch.uint8),
            "patch_target": target.view(n, r, -1).to(torch.uint8),
        }
        if split in self.crop_splits:
            scorer = TiPAIScorer(bb, grid=gh, methods=("crops",), crop_batch_size=512)
            out["crops"] = scorer.crops(images_t, per_image_text.to(bb.device)).cpu().view(n, r, -1)
        return {k: v.contiguous() for k, v in out.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        tensors = self.features[split]
        if not shuffle:
            return eval_loader(
                IndexDataset(tensors["text"].shape[0]), self.batch_size, _Collate(tensors), self.num_workers
            )
        return DataLoader(
            IndexDataset(tensors["text"].shape[0]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=_Collate(tensors),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
