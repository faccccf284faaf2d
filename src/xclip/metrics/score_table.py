"""A table of per-item scores accumulated over an evaluation and gathered across processes."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def unique_rows(columns: dict[str, Tensor], keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Keep the first row of every distinct value of the `keys` columns (rows [N] -> [M], in their
    original order). A ``DistributedSampler`` pads every process to the same length by repeating
    items, so gathered per-item rows hold repeats: dropping them by item index gives exactly the
    rows of one process."""
    if not keys:
        return columns
    key = torch.stack([columns[k].to(torch.int64) for k in keys], dim=1)
    n = key.shape[0]
    if n == 0:
        return columns
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.int64, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=key.device), reduce="amin")
    keep = first.sort().values
    return {name: value[keep] for name, value in columns.items()}


class ScoreTable(Metric):
    """Rows of named columns: ``update(col=[B] tensor, ...)`` appends B rows; ``compute()`` returns
    every column [N] (float64, or int64 for `int_columns`), concatenated over updates and, under
    distributed training, over processes (rank order), so scores can be re-combined after the pass.

    Args:
        columns: the float columns.
        int_columns: integer columns (codes, classes, flags).
        unique_by: integer columns that identify an item (e.g. ``("split", "index")``): `compute`
            keeps the first row of each item, so the padded repeats of a ``DistributedSampler``
            are scored once and several processes give the numbers of one.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, columns: tuple[str, ...], int_columns: tuple[str, ...] = (), unique_by: tuple[str, ...] = (),
                 **kwargs):
        super().__init__(**kwargs)
        if set(columns) & set(int_columns):
            raise ValueError(f"columns {sorted(set(columns) & set(int_columns))} are listed twice")
        if not set(unique_by) <= set(int_columns):
            raise ValueError(f"unique_by {sorted(set(unique_by) - set(int_columns))} must be integer columns")
        self.float_columns, self.int_columns, self.unique_by = tuple(columns), tuple(int_columns), tuple(unique_by)
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
        return unique_rows(out, self.unique_by)

    def rows(self) -> dict[str, Tensor]:
        """`compute()` with every column kept [N] (torchmetrics squeezes one-element results to 0-d)."""
        return {name: value.reshape(-1) for name, value in self.compute().items()}
