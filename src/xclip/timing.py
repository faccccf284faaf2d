"""Wall-clock timing for the benchmarks in ``scripts/`` (ratios measured in one process).

CUDA kernels run asynchronously: on a GPU the clock only means something when the device is
synchronised before it starts and before it stops, which both functions do for a CUDA `device`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str | torch.device = "cpu") -> None:
    """Wait for the queued kernels of a CUDA device; nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def once(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds of one call of `fn` (no warm-up)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, device: str | torch.device = "cpu") -> float:
    """Median seconds of `repeats` calls of `fn`, after one untimed warm-up call."""
    fn()
    return statistics.median(once(fn, device) for _ in range(repeats))
