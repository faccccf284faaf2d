"""A table of per-item scores accumulated over an evaluation and gathered across processes."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class ScoreTable(Metric):
    """Rows of named columns: ``update(col=[B] tensor, ...)`` appends B rows; ``compute()`` returns
    every column [N] (float64, or int64 for `int_columns`), concatenated over updates and, under
    distributed training, over processes (rank order), so scores can be re-combined after the pass.

    Args:
        columns: the float columns.
        int_columns: integer columns (codes, classes, flags).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, columns: tuple[str, ...], int_columns: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        if set(columns) & set(int_columns):
            raise ValueError(f"columns {sorted(set(columns) & set(int_columns))} are listed twice")
        self.float_columns, self.int_columns = tuple(columns), tuple(int_columns)
        for name in self.float_columns + self.int_columns:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **values: Tensor) -> None:
        expected = set(self.float_columns + self.int_columns)
        if set(values) != expected:
            raise ValueError(f"ScoreTable.update needs exactly the columns {sorted(expected)}, got {sorted(values)}")
        lengths = {tuple(v.shape) for v in values.values()}
        if len(lengths) != 1 or len(next(iter(lengths))) != 1:
            raise ValueError(f"every column must be one [B] tensor of the same B, got shapes {sorted(lengths)}")
        for name, value in values.items():
            dtype = torch.int64 if name in self.int_columns else torch.float64
            getattr(self, name).append(value.detach().to(dtype))

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name in self.float_columns + self.int_columns:
            state = getattr(self, name)
            dtype = torch.int64 if name in self.int_columns else torch.float64
            out[name] = dim_zero_cat(state) if (isinstance(state, Tensor) or state) else torch.zeros(0, dtype=dtype)
        return out
