"""`OODDataModule`: ID, OOD and ID-calibration loaders for zero-shot OOD detection.

Every batch is tagged ``task="ood"``, ``split`` (its set's name), ``role`` (``id``, ``ood`` or
``calib``) and ``skipped`` (unreadable images dropped from it). Loaders come in the order
calibration, ID, then the OOD sets.

Sources:
- ``shapes`` (embedded default): ShapesWorld's spurious variant. ID = :class:`SpuriousShapes`
  (``square`` on land / ``circle`` on water, 95% correlated); OOD = background-only images
  (``ood_background``) and novel shapes (``ood_novel_shape``), reported separately; calibration
  = more ID images from another seed.
- ``waterbirds``: ID = a WaterBirds split (`root`, `split`), calibration = another split
  (`calib_split`, default val); OOD = one image folder per entry of `ood_dirs` (e.g. PlacesBG).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from xclip.data.image_folder import ImageFolder, collate_skipping
from xclip.data.shapes import SpuriousShapes
from xclip.ood.waterbirds import WaterBirds

SOURCES = ("shapes", "waterbirds")
ROLES = ("calib", "id", "ood")


class TaggedCollate:
    """Collate that drops unreadable items and tags the batch with its task, split and role."""

    def __init__(self, split: str, role: str):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.split, self.role = split, role

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        batch = collate_skipping(items)
        batch.update(task="ood", split=self.split, role=self.role)
        return batch


class OODDataModule(pl.LightningDataModule):
    """ID / OOD / calibration sets for `NegAlignModule` (validate or test).

    Args:
        source: ``shapes`` or ``waterbirds``.
        root: WaterBirds root (``metadata.csv`` + image folders).
        ood_dirs: OOD set name -> image folder (searched recursively), for ``waterbirds``.
        split, calib_split: WaterBirds splits of the ID and calibration sets (None: no calibration).
        image_size: side of the loaded images (the backbone resizes again if it differs);
            default 64 for ``shapes``, 224 for ``waterbirds``.
        n_id, n_ood, n_calib, seed, shapes_options: ShapesWorld set sizes (``n_calib`` 0: none),
            base seed and extra :class:`SpuriousShapes` arguments (classes, places, correlation).
    """

    def __init__(self, source: str = "shapes", root: str | None = None, ood_dirs: dict[str, str] | None = None,
                 split: int | str = "test", calib_split: int | str | None = "val", image_size: int | None = None,
                 n_id: int = 1000, n_ood: int = 1000, n_calib: int = 500, seed: int = 0,
                 shapes_options: dict[str, Any] | None = None, batch_size: int = 64, num_workers: int = 0):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "waterbirds" and (root is None or not ood_dirs):
            raise ValueError("source 'waterbirds' needs `root` (the WaterBirds folder) and `ood_dirs` "
                             "(name -> image folder, e.g. {placesbg: data/placesbg})")
        self.source, self.root, self.ood_dirs = source, root, dict(ood_dirs or {})
        self.split, self.calib_split = split, calib_split
        self.image_size = image_size or (64 if source == "shapes" else 224)
        self.n_id, self.n_ood, self.n_calib, self.seed = n_id, n_ood, n_calib, seed
        self.shapes_options = dict(shapes_options or {})
        self.batch_size, self.num_workers = batch_size, num_workers

    def sets(self) -> list[tuple[str, str, Dataset]]:
        """``(split name, role, dataset)`` in loader order: calibration, ID, OOD sets."""
        out: list[tuple[str, str, Dataset]] = []
        if self.source == "shapes":
            def shapes(n: int, seed: int, ood: str | None) -> SpuriousShapes:
                return SpuriousShapes(n=n, seed=seed, image_size=self.image_size, ood=ood, **self.shapes_options)

            base = self.seed + 1000  # held-out streams, as ShapesWorldDataModule
            if self.n_calib > 0:
                out.append(("calib", "calib", shapes(self.n_calib, base + 1000, None)))
            out.append(("id", "id", shapes(self.n_id, base, None)))
            out.append(("ood_background", "ood", shapes(self.n_ood, base + 1, "background")))
            out.append(("ood_novel_shape", "ood", shapes(self.n_ood, base + 2, "novel_shape")))
            return out
        if self.calib_split is not None:
            out.append(("calib", "calib", WaterBirds(self.root, self.calib_split, self.image_size)))
        out.append(("id", "id", WaterBirds(self.root, self.split, self.image_size)))
        out.extend((f"ood_{name}", "ood", ImageFolder(path, self.image_size)) for name, path in self.ood_dirs.items())
        return out

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                           collate_fn=TaggedCollate(name, role), persistent_workers=self.num_workers > 0)
                for name, role, ds in self.sets()]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
