"""`OODDataModule`: ID, OOD and ID-calibration loaders for zero-shot OOD detection.

Every batch is tagged ``task="ood"``, ``split`` (its set's name), ``role`` (``id``, ``ood`` or
``calib``), ``partition`` (``val`` or ``test``: which held-out data the set belongs to) and
``skipped`` (unreadable images dropped from it, with their paths in ``skipped_paths``).

``validate`` serves calibration, then the validation ID and OOD sets. ``test`` serves
calibration, the validation sets again (partition ``val``: the module chooses its lambda there)
and then the test sets (partition ``test``: the reported numbers), so a hyper-parameter picked
on validation is applied to data it never saw.

Sources:
- ``shapes`` (embedded default): ShapesWorld's spurious variant. ID = :class:`SpuriousShapes`
  (``square`` on land / ``circle`` on water, 95% correlated); OOD = background-only images
  (``ood_background``) and novel shapes (``ood_novel_shape``), reported separately; calibration
  = more ID images from another seed. Test sets come from ShapesWorld's test key family,
  disjoint from every validation sample.
- ``waterbirds``: ID = the WaterBirds ``val_split`` / ``test_split``, calibration = ``calib_split``
  (default train); OOD = one image folder per entry of `ood_dirs` (e.g. PlacesBG). Image folders
  have no splits, so each is divided once by a seeded permutation: ``ood_test_fraction`` of its
  images form the test part, the rest the validation part.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from xclip.data.image_folder import ImageFolder, collate_skipping
from xclip.data.sampling import eval_loader
from xclip.data.shapes import SpuriousShapes
from xclip.ood.waterbirds import WaterBirds

SOURCES = ("shapes", "waterbirds")
ROLES = ("calib", "id", "ood")
PARTITIONS = ("val", "test")


class TaggedCollate:
    """Collate that drops unreadable items and tags the batch with its task, split, role and partition."""

    def __init__(self, split: str, role: str, partition: str = "val"):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        self.split, self.role, self.partition = split, role, partition

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_skipping(items)
        batch.update(task="ood", split=self.split, role=self.role, partition=self.partition)
        return batch


class OODDataModule(pl.LightningDataModule):
    """ID / OOD / calibration sets for `NegAlignModule` (validate or test).

    Args:
        source: ``shapes`` or ``waterbirds``.
        data_root: WaterBirds root (``metadata.csv`` + image folders).
        ood_dirs: OOD set name -> image folder (searched recursively), for ``waterbirds``.
        val_split, test_split: WaterBirds splits of the validation and test ID sets.
        calib_split: WaterBirds split of the ID calibration set (None: no calibration); must differ
            from both evaluated splits.
        ood_test_fraction, holdout_seed: how each OOD image folder is divided into validation and
            test parts.
        image_size: side of the loaded images (the backbone resizes again if it differs);
            default 64 for ``shapes``, 224 for ``waterbirds``.
        n_id, n_ood, n_calib, seed, shapes_options: ShapesWorld set sizes (``n_calib`` 0: none),
            base seed and extra :class:`SpuriousShapes` arguments (classes, places, correlation).
    """

    def __init__(
        self,
        source: str = "shapes",
        data_root: str | None = None,
        ood_dirs: dict[str, str] | None = None,
        val_split: int | str = "val",
        test_split: int | str = "test",
        calib_split: int | str | None = "train",
        ood_test_fraction: float = 0.5,
        holdout_seed: int = 0,
        image_size: int | None = None,
        n_id: int = 1000,
        n_ood: int = 1000,
        n_calib: int = 500,
        seed: int = 0,
        shapes_options: dict[str, Any] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "waterbirds" and (data_root is None or not ood_dirs):
            raise ValueError(
                "source 'waterbirds' needs `data_root` (the WaterBirds folder) and `ood_dirs` "
                "(name -> image folder, e.g. {placesbg: data/placesbg})"
            )
        if calib_split is not None and calib_split in (val_split, test_split):
            raise ValueError(
                f"calib_split {calib_split!r} is also an evaluated split: calibration statistics must "
                "come from other ID data (e.g. calib_split: train)"
            )
        if not 0.0 < ood_test_fraction < 1.0:
            raise ValueError(f"ood_test_fraction must lie in (0, 1), got {ood_test_fraction}")
        self.source, self.data_root, self.ood_dirs = source, data_root, dict(ood_dirs or {})
        self.val_split, self.test_split, self.calib_split = val_split, test_split, calib_split
        self.ood_test_fraction, self.holdout_seed = ood_test_fraction, holdout_seed
        self.image_size = image_size or (64 if source == "shapes" else 224)
        self.n_id, self.n_ood, self.n_calib, self.seed = n_id, n_ood, n_calib, seed
        self.shapes_options = dict(shapes_options or {})
        self.batch_size, self.num_workers = batch_size, num_workers

    def _holdout_part(self, folder: ImageFolder, partition: str) -> Dataset:
        """The validation or test part of an OOD image folder (a fixed seeded division)."""
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(self.holdout_seed)).tolist()
        n_test = min(len(folder) - 1, max(1, round(self.ood_test_fraction * len(folder))))
        part = order[:n_test] if partition == "test" else order[n_test:]
        return Subset(folder, sorted(part))

    def sets(self, partition: str = "val") -> list[tuple[str, str, Dataset]]:
        """``(split name, role, dataset)`` of the ID and OOD sets of one partition (``val`` /
        ``test``), in loader order."""
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        if self.source == "shapes":
            base = self.seed + 1000  # held-out streams, as ShapesWorldDataModule

            def shapes(n: int, seed: int, ood: str | None) -> SpuriousShapes:
                return SpuriousShapes(
                    n=n, seed=seed, image_size=self.image_size, ood=ood, split=partition, **self.shapes_options
                )

            return [
                ("id", "id", shapes(self.n_id, base, None)),
                ("ood_background", "ood", shapes(self.n_ood, base + 1, "background")),
                ("ood_novel_shape", "ood", shapes(self.n_ood, base + 2, "novel_shape")),
            ]
        split = self.test_split if partition == "test" else self.val_split
        assert self.data_root is not None  # __init__ refuses source 'waterbirds' without data_root
        out: list[tuple[str, str, Dataset]] = [("id", "id", WaterBirds(self.data_root, split, self.image_size))]
        out.extend(
            (f"ood_{name}", "ood", self._holdout_part(ImageFolder(path, self.image_size), partition))
            for name, path in self.ood_dirs.items()
        )
        return out

    def calibration_set(self) -> Dataset | None:
        """ID images for M3's z-score statistics (never evaluated), or None."""
        if self.source == "shapes":
            if self.n_calib <= 0:
                return None
            return SpuriousShapes(
                n=self.n_calib, seed=self.seed + 2000, image_size=self.image_size, **self.shapes_options
            )
        if self.calib_split is None:
            return None
        assert self.data_root is not None  # __init__ refuses source 'waterbirds' without data_root
        return WaterBirds(self.data_root, self.calib_split, self.image_size)

    def _loader(self, ds: Dataset, split: str, role: str, partition: str) -> DataLoader:
        return eval_loader(ds, self.batch_size, TaggedCollate(split, role, partition), self.num_workers)

    def _loaders(self, partitions: tuple[str, ...]) -> list[DataLoader]:
        calib = self.calibration_set()
        out = [] if calib is None else [self._loader(calib, "calib", "calib", "val")]
        for partition in partitions:
            out.extend(self._loader(ds, name, role, partition) for name, role, ds in self.sets(partition))
        return out

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders(("val",))

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders(("val", "test"))
