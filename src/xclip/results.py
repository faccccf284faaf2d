"""Where a run's outputs go and what ``results.json`` holds.

Every module, callback and the CLI asks `run_directory(trainer)` for the folder of the run (the
logger's log directory), and the CLI writes `results.json` there with `write_results`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from xclip.io import atomic_write_text


def _plain(value: Any) -> Any:
    """Metric values as JSON numbers (NaN/inf as null, which JSON has no literal for)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_directory(trainer) -> Path:
    """Where the run's artefacts go: the logger's log_dir, else the trainer's root dir."""
    logger = trainer.logger
    path = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(path or trainer.default_root_dir)


def write_results(trainer, model, stage: str, config: dict[str, Any]) -> Path:
    """Write ``results.json`` for a finished validate/test run and return its path."""
    out_dir = run_directory(trainer)
    metrics = {k: _plain(v) for k, v in sorted(trainer.callback_metrics.items())}
    extra = model.extra_results() if hasattr(model, "extra_results") else {}
    payload = {
        "stage": stage,
        "metrics": metrics,
        **extra,
        "config": config,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out_dir / "results.json"
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    return path
