"""`ExportMixin`: the wiring of every fit that exports a model folder (`xclip.model_folder`).

A module that trains something shippable takes ``export: bool``, ``export_dir: str | None`` and
``overwrite: bool``, hands them to `set_export` in its constructor and implements
``export_model(path)`` with `xclip.model_folder.save_folder`. Where to export is not a property of
the model, so the three are not hyperparameters (`EXPORT_ARGUMENTS`: a resumed fit may export
elsewhere). The mixin does the rest, the same way for every workflow: the target is ``export_dir``, else
``<run directory>/model`` (never the shipped ``checkpoints/`` by default); it is checked in
``setup("fit")``, before the first step (an existing model folder needs ``overwrite: true``, a
file is refused); the export runs once, on rank 0, at the end of the fit, and says where it went.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_only

from xclip.results import export_target, refuse_export_over

EXPORT_ARGUMENTS = ("export", "export_dir", "overwrite")


class ExportMixin:
    """Mix into an `EvaluationModule` (before it in the bases); list `EXPORT_ARGUMENTS` in its
    ``not_hyperparameters`` and call `set_export` in its constructor.

    Class attributes:
        shipped_folder: the shipped folder this recipe re-makes, named in the overwrite refusal.
    """

    shipped_folder: ClassVar[str] = "checkpoints/"
    trainer: Any
    export: bool = True
    export_dir: str | None = None
    overwrite: bool = False
    exported_to: Path | None = None

    def set_export(self, export: bool, export_dir: str | None, overwrite: bool) -> None:
        """Whether, where and over what this fit exports (see the module docstring)."""
        self.export, self.export_dir, self.overwrite = bool(export), export_dir, bool(overwrite)

    def export_model(self, path: Path) -> None:
        """Write the trained model as a model folder at `path` (`xclip.model_folder.save_folder`,
        with ``overwrite=self.overwrite``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement export_model(path)")

    def export_path(self) -> Path | None:
        """Where this fit exports (None when ``export`` is off)."""
        return export_target(self.trainer, self.export, self.export_dir)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before anything else of the fit: never refuse after hours of training
            refuse_export_over(self.export_path(), self.overwrite, self.shipped_folder)
        super().setup(stage)  # type: ignore[misc]

    def on_fit_end(self) -> None:
        super().on_fit_end()  # type: ignore[misc]
        path = self.export_path()
        if path is not None and self.trainer.is_global_zero:
            self.export_model(path)
            self.exported_to = path
            _announce(f"{type(self).__name__}: exported the trained model to {path}")


@rank_zero_only
def _announce(message: str) -> None:
    print(message)
