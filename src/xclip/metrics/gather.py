"""Gathering small Python objects (file paths, names) from every process, for reports."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process in rank order (``[obj]`` without an initialised process group).
    Every process must call it (it is a collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
