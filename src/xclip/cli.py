"""The ``xclip`` command: a LightningCLI (fit / validate / test / predict) driven by YAML configs.

After validate and test it writes ``results.json`` (the metrics, anything the module adds through
``extra_results()``, and a summary of the run's config) into the logger's log directory and
prints where it wrote.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

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


class XClipCLI(LightningCLI):
    """LightningCLI that writes results.json after validate/test."""

    def _config_summary(self) -> dict[str, Any]:
        cfg = self.config.get(self.subcommand, self.config)
        summary = {}
        for key in ("model", "data", "ckpt_path", "seed_everything"):
            if key in cfg:
                summary[key] = json.loads(json.dumps(cfg[key], default=lambda o: getattr(o, "__dict__", str(o))))
        summary["trainer"] = {k: cfg["trainer"].get(k) for k in ("accelerator", "devices", "precision",
                                                                   "limit_val_batches", "limit_test_batches")}
        return summary

    def _after_eval(self, stage: str) -> None:
        if not self.trainer.is_global_zero:
            return
        path = write_results(self.trainer, self.model, stage, self._config_summary())
        print(f"xclip: wrote {path} (TensorBoard logs in {path.parent})")

    def after_validate(self) -> None:
        self._after_eval("validate")

    def after_test(self) -> None:
        self._after_eval("test")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``xclip`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    XClipCLI(
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        args=args,
    )


if __name__ == "__main__":
    main()
