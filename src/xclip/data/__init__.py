"""Datasets: ShapesWorld (embedded) and loaders for the real formats."""

from xclip.data.shapes import ShapesWorldDataModule

__all__ = ["ShapesWorldDataModule"]
