"""`CombinedDataModule`: the validation/test loaders of several datamodules, one after another
(for `xclip.suite.EvaluationSuite`, which routes their batches by ``batch["task"]``)."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader


class CombinedDataModule(pl.LightningDataModule):
    """Args:
    datamodules: name -> datamodule; loaders are concatenated in this order.
    """

    def __init__(self, datamodules: dict[str, pl.LightningDataModule]):
        super().__init__()
        if not datamodules:
            raise ValueError("CombinedDataModule needs at least one datamodule under `datamodules`")
        self.datamodules = dict(datamodules)

    def find(self, kind: type) -> pl.LightningDataModule | None:
        """The first member datamodule of type `kind`, or None."""
        return next((dm for dm in self.datamodules.values() if isinstance(dm, kind)), None)

    def setup(self, stage: str) -> None:
        for dm in self.datamodules.values():
            dm.trainer = self.trainer
            dm.setup(stage)

    def _loaders(self, method: str) -> list[DataLoader]:
        out: list[DataLoader] = []
        for dm in self.datamodules.values():
            loaders = getattr(dm, method)()
            out.extend(loaders if isinstance(loaders, (list, tuple)) else [loaders])
        return out

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders("val_dataloader")

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders("test_dataloader")
