"""The learning-rate schedule every xclip fit uses: linear warm-up, then cosine decay to 0."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based): ``(step + 1) / warm``
    for the first ``warm = min(warmup_steps, total_steps // 2)`` steps, then a cosine from 1 to 0 over
    the rest (0 after `total_steps`)."""
    warm = min(max(warmup_steps, 0), total_steps // 2)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(total_steps - warm, 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> dict[str, object]:
    """Lightning's ``lr_scheduler`` entry for `warmup_cosine`, stepped every optimiser step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    return {"scheduler": scheduler, "interval": "step"}
