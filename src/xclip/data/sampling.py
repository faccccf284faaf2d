"""Evaluation loaders whose batches are the same under any number of processes.

A plain ``DistributedSampler`` deals items round-robin, so under DDP every batch holds other images
than in a single process, and batched matmuls round differently: per-item scores move in the 7th
digit and a near-tie can flip a ranking metric. `BatchAlignedSampler` deals whole batches instead
(batch k = items ``[k*B, (k+1)*B)`` goes to process ``k mod W``): every batch, and so every
per-item number, is bit-identical to the single-process run. Processes with fewer batches repeat
whole batches (first ones first) to keep the step counts equal; the repeats are dropped by item
index before scoring (`xclip.metrics.ScoreTable(unique_by=...)`).

It subclasses ``DistributedSampler`` so Lightning keeps it instead of inserting its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class BatchAlignedSampler(DistributedSampler):
    """Indices of this process's batches, in order; the dataset's last (partial) batch, if any,
    is the last batch of its process, so a ``DataLoader`` with the same `batch_size` cuts the
    stream back into exactly these batches.

    Args:
        dataset: the evaluation dataset (not shuffled).
        batch_size: the loader's batch size.
        num_replicas, rank: default: the initialised process group, else one process.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int | None = None, rank: int | None = None):
        if not isinstance(dataset, Sized):
            raise TypeError(
                f"BatchAlignedSampler needs a dataset with a length (map-style), got {type(dataset).__name__}"
            )
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        n = len(dataset)
        n_batches = math.ceil(n / batch_size)
        mine = list(range(rank, n_batches, num_replicas))
        per_process = math.ceil(n_batches / num_replicas) if n_batches else 0
        # pad with whole full batches; a dataset smaller than one batch pads with that one batch
        full = [b for b in range(n_batches) if (b + 1) * batch_size <= n] or list(range(n_batches))
        pads = [full[i % len(full)] for i in range(per_process - len(mine))] if full else []
        # the partial batch (if this process has it) goes last, after any padding
        partial = [b for b in mine if (b + 1) * batch_size > n]
        order = [b for b in mine if b not in partial] + pads + partial
        self._indices = [i for b in order for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        self.num_samples = len(self._indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return self.num_samples


class IndexDataset(Dataset):
    """Items 0..n-1 themselves: for loaders over data already in memory (cached features), where
    the collate function gathers the rows of the batch's indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def eval_loader(dataset: Dataset, batch_size: int, collate_fn: Callable, num_workers: int = 0) -> DataLoader:
    """A validation/test loader over `dataset` in order, sharded by whole batches under DDP."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=BatchAlignedSampler(dataset, batch_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
    )
