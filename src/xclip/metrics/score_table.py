"""`ScoreTable`: the one table of per-item rows that every evaluation accumulates, gathers across
processes and de-duplicates by item key before scoring (scores, labels, predictions, embeddings)."""

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
    """Rows of named columns: ``update(col=[B] or [B, D] tensor, ...)`` appends B rows; ``compute()``
    returns every column, concatenated over updates and, under distributed training, over processes
    (rank order), so scores can be re-combined after the pass.

    Args:
        columns: float columns [B], stored as float64.
        int_columns: integer columns [B] (codes, classes, flags, item indices), int64.
        vector_columns: float columns [B, D] (embeddings), stored as float32 as computed.
        unique_by: integer columns that identify an item (e.g. ``("split", "index")``): `compute`
            keeps the first row of each item, so the padded repeats of a ``DistributedSampler``
            are scored once and several processes give the numbers of one.
        sort: order the rows by the `unique_by` columns (lexicographically), so the result does not
            depend on how the data was sharded across processes.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        columns: tuple[str, ...] = (),
        int_columns: tuple[str, ...] = (),
        unique_by: tuple[str, ...] = (),
        vector_columns: tuple[str, ...] = (),
        sort: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        names = [*columns, *int_columns, *vector_columns]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"columns {repeated} are listed twice")
        if not set(unique_by) <= set(int_columns):
            raise ValueError(f"unique_by {sorted(set(unique_by) - set(int_columns))} must be integer columns")
        if sort and not unique_by:
            raise ValueError("sort=True orders rows by the unique_by columns: name them")
        self.float_columns, self.int_columns = tuple(columns), tuple(int_columns)
        self.vector_columns, self.unique_by, self.sort = tuple(vector_columns), tuple(unique_by), sort
        self._dtypes = {
            **dict.fromkeys(self.float_columns, torch.float64),
            **dict.fromkeys(self.int_columns, torch.int64),
            **dict.fromkeys(self.vector_columns, torch.float32),
        }
        for name in self._dtypes:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **values: Tensor) -> None:
        if set(values) != set(self._dtypes):
            raise ValueError(
                f"ScoreTable.update needs exactly the columns {sorted(self._dtypes)}, got {sorted(values)}"
            )
        lengths = {int(v.shape[0]) if v.ndim else -1 for v in values.values()}
        bad = [n for n, v in values.items() if v.ndim != (2 if n in self.vector_columns else 1)]
        if len(lengths) != 1 or bad:
            shapes = {n: tuple(v.shape) for n, v in values.items()}
            raise ValueError(
                f"every column must be one [B] tensor ([B, D] for {list(self.vector_columns)}) of the "
                f"same B, got shapes {shapes}"
            )
        for name, value in values.items():
            getattr(self, name).append(value.detach().to(self._dtypes[name]))

    def _table(self) -> dict[str, Tensor]:
        out = {}
        for name, dtype in self._dtypes.items():
            state = getattr(self, name)
            if isinstance(state, Tensor) or state:
                out[name] = dim_zero_cat(state)
            else:
                out[name] = torch.zeros((0, 0) if name in self.vector_columns else 0, dtype=dtype)
        rows = unique_rows(out, self.unique_by)
        if self.sort and rows[self.unique_by[0]].numel() > 1:
            order = torch.arange(rows[self.unique_by[0]].numel(), device=rows[self.unique_by[0]].device)
            for key in reversed(self.unique_by):  # stable sorts, last key first: lexicographic order
                order = order[rows[key][order].argsort(stable=True)]
            rows = {name: value[order] for name, value in rows.items()}
        return rows

    def compute(self) -> dict[str, Tensor]:
        return self._table()

    def rows(self) -> dict[str, Tensor]:
        """Every column at full shape ([N], or [N, D] for vector columns), gathered from every process
        (`compute` squeezes one-element results, which is why this exists)."""
        with self.sync_context():
            return self._table()

    def gathered_rows(self, strategy) -> dict[str, Tensor] | None:
        """Every process's rows, de-duplicated (and sorted with ``sort``); None when no process saw
        any. A collective: every process must call it. `strategy` is ``trainer.strategy``."""
        if not strategy.reduce_boolean_decision(self.update_called, all=False):
            return None
        return self.rows()
