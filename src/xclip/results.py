"""Where a run's outputs go, what ``results.json`` holds and the console report of a run.

Every module, callback and the CLI asks `run_directory(trainer)` for the folder of the run (the
logger's log directory), and the CLI writes `results.json` there with `write_results`. Evaluation
modules describe their logged metrics with `ReportRow`s (``report_rows(metrics)``), which the CLI
prints as one table (`format_report`) followed by where everything went (`output_listing`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xclip.io import atomic_write_text, recover_directory


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


_BOOKKEEPING = ("config.yaml", "hparams.yaml")


def _events_hold_results(file: Path) -> bool:
    """Whether a TensorBoard event file holds anything but the file header and hyperparameters (with
    the ``hp_metric`` placeholder TensorBoardLogger writes beside them)."""
    from google.protobuf.message import DecodeError
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    try:
        for event in EventFileLoader(str(file)).Load():
            if event.HasField("summary") and any(
                v.metadata.plugin_data.plugin_name != "hparams" and v.tag != "hp_metric" for v in event.summary.value
            ):
                return True
    except (OSError, ValueError, DecodeError):  # an unreadable event file is not ours to judge: keep it
        return True
    return False


def discard_failed_run(run_dir: Path) -> bool:
    """Remove the run directory of a run that failed before producing anything (only Lightning's
    config.yaml / hparams.yaml and an event file without results), so a failed command leaves no
    empty ``version_N`` behind; anything else keeps the directory. Returns whether it was removed."""
    if not run_dir.is_dir():
        return False
    for entry in run_dir.iterdir():
        if entry.is_dir() or not (entry.name in _BOOKKEEPING or entry.name.startswith("events.out.tfevents.")):
            return False
        if entry.name.startswith("events.out.tfevents.") and _events_hold_results(entry):
            return False
    shutil.rmtree(run_dir)
    with contextlib.suppress(OSError):  # the experiment's folder too, if this run was its only one
        run_dir.parent.rmdir()
    return True


def export_target(trainer, export: bool, export_dir: str | None) -> Path | None:
    """Where a fit exports its trained weights: `export_dir`, else ``<run directory>/model`` (never
    the shipped ``checkpoints/`` by default); None when `export` is off."""
    if not export:
        return None
    return Path(export_dir).expanduser() if export_dir else run_directory(trainer) / "model"


def refuse_export_over(target: Path | None, overwrite: bool, shipped: str) -> None:
    """Raise before training (call it from ``setup("fit")``) when the export could not or should not
    happen after it: `target` (or a folder above it) is a file, or `target` is a non-empty directory
    and `overwrite` is off, so a fit never replaces weights by accident, and never fails after hours
    of training. `shipped` names the shipped folder the message suggests re-making on purpose.
    A backup a killed export left next to `target` is restored first (`xclip.io.recover_directory`)."""
    if target is None:
        return
    for folder in (target, *target.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"export_dir {target}: {folder} is a file; pass a directory (new or existing)")
    recover_directory(target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"export_dir {target} already exists: this fit would replace it. Export elsewhere (default: "
            "the run's log directory), or set `overwrite: true` to replace it on purpose (e.g. to re-make "
            f"the shipped {shipped}; see its README)"
        )


def write_results(trainer, model, stage: str, config: dict[str, Any]) -> Path:
    """Write ``results.json`` for a finished validate/test run and return its path."""
    out_dir = run_directory(trainer)
    metrics = {k: _plain(v) for k, v in sorted(trainer.callback_metrics.items())}
    from xclip.engine import ReportsResults  # the engine builds on this module

    extra = model.extra_results() if isinstance(model, ReportsResults) else {}
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


@dataclass
class ReportRow:
    """One line of the console report: a workflow, what was measured (a full name, never a
    truncated metric key) and its values (``{"": v}`` for one number, or named columns such as
    ``{"AUROC": ..., "FPR95": ...}``), with the logged metric keys it shows."""

    workflow: str
    name: str
    values: Mapping[str, float | None]  # None: not measured (shown as n/a)
    keys: list[str] = field(default_factory=list)


def metric_values(trainer_metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The trainer's logged metrics as plain floats (NaN/inf as None)."""
    return {k: _plain(v) for k, v in sorted(trainer_metrics.items())}


def _cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def format_report(rows: Sequence[ReportRow], metrics: Mapping[str, float | None]) -> str:
    """One table, grouped by workflow: ``workflow | measured | value(s)``. Every logged metric
    appears exactly once: those no row claims are listed under "other" with their key."""
    claimed = {k for row in rows for k in row.keys}
    rows = list(rows) + [
        ReportRow("other", key, {"": value}, [key]) for key, value in metrics.items() if key not in claimed
    ]
    lines: list[tuple[str, str, str]] = []
    last = None
    for row in rows:
        values = " | ".join(_cell(v) if not label else f"{label} {_cell(v)}" for label, v in row.values.items())
        lines.append((row.workflow if row.workflow != last else "", row.name, values))
        last = row.workflow
    header = ("workflow", "measured", "value")
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(3)]
    rule = "-+-".join("-" * w for w in widths)
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), rule]
    for i, line in enumerate(lines):
        if i and line[0]:
            out.append(rule)
        out.append(fmt.format(*line))
    return "\n".join(out)


def output_listing(run_dir: Path, results_path: Path) -> str:
    """Where a run's outputs went: results.json, the TensorBoard command, explanation folders
    and plots."""
    lines = [f"results:      {results_path}", f"TensorBoard:  tensorboard --logdir {run_dir}"]
    explanation_dirs = sorted({p.parent for p in run_dir.glob("explanations/**/*.png")})
    for folder in explanation_dirs:
        n = len(list(folder.glob("*.png")))
        lines.append(f"explanations: {folder}/ ({n} PNG)")
    plots = sorted(p for p in run_dir.glob("*.png"))
    if plots:
        lines.append("plots:        " + ", ".join(str(p) for p in plots))
    tables = sorted(p for p in run_dir.glob("*.csv"))
    if tables:
        lines.append("tables:       " + ", ".join(str(p) for p in tables))
    other = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name not in ("explanations", "checkpoints"))
    for folder in other:
        lines.append(f"more:         {folder}/")
    return "\n".join(lines)
