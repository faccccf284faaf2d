"""BatchAlignedSampler: under W processes every batch equals a single-process batch, every item is
served, the step counts are equal, and the repeats are whole batches."""

import pytest
from torch.utils.data import DataLoader

from xclip.data.sampling import BatchAlignedSampler


@pytest.mark.parametrize(("n", "batch", "world"), [(41, 10, 2), (40, 10, 2), (7, 3, 3), (5, 10, 2), (41, 10, 1)])
def test_batches_are_the_single_process_batches(n, batch, world):
    data = list(range(n))
    single = [tuple(b.tolist()) for b in DataLoader(data, batch_size=batch)]
    per_rank = [
        [
            tuple(b.tolist())
            for b in DataLoader(data, batch_size=batch, sampler=BatchAlignedSampler(data, batch, world, r))
        ]
        for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1  # equal step counts: no process waits at a collective
    seen = [b for rank in per_rank for b in rank]
    assert set(seen) == set(single)  # every batch is a single-process batch, every item is served
    assert sorted(i for b in set(seen) for i in b) == data
    for rank, batches in enumerate(per_rank):
        assert batches[: len(range(rank, len(single), world))] == single[rank::world]  # own batches first


def test_one_process_is_sequential():
    assert list(BatchAlignedSampler(list(range(9)), 4)) == list(range(9))
    with pytest.raises(ValueError, match="batch_size"):
        BatchAlignedSampler([1, 2], 0)
