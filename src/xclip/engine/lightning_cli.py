"""The LightningCLI of ``xclip fit | validate | test`` (imported by `xclip.cli` only for those).

After validate and test it writes ``results.json`` (the metrics, anything the module adds through
``extra_results()``, and a summary of the run's config) into the logger's log directory and
prints one report: a table of the results grouped by workflow with full metric names (rows come
from the modules' ``report_rows``), then where everything went (results.json, the TensorBoard
command, explanation folders, plots). Lightning's own per-dataloader tables and tips are off.
``predict`` is not a subcommand: the evaluation modules write their per-item outputs during
validate/test (``per_image.csv``, ``failures.csv``, explanation indexes). A run that fails before
producing anything leaves no ``version_N`` folder behind.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from xclip.engine.evaluation import ReportsResults
from xclip.results import (
    ReportRow,
    discard_failed_run,
    format_report,
    metric_values,
    output_listing,
    run_directory,
    write_results,
)

# Lightning's advertisements, and deprecation notices raised inside Lightning itself about its own
# internals: nothing a user can act on. Every other warning still shows.
_TIP_MARKER = "💡 Tip:"
_KNOWN_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"LightningCLI's args parameter is intended to run from within Python",  # main() passes the filtered argv
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TIP_MARKER not in record.getMessage()


def quiet_lightning() -> None:
    """Silence Lightning's tips and its known internal deprecation notices (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


class XClipCLI(LightningCLI):
    """LightningCLI that writes results.json and prints the report after validate/test."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        subcommands = dict(LightningCLI.subcommands())
        subcommands.pop("predict", None)
        return subcommands

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "verbose" in self._subcommand_method_arguments.get(subcommand, {}):
            # xclip prints its own report (one table, every metric once, full names)
            parser.set_defaults(verbose=False)
        return parser

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a --ckpt_path's hyper-parameters with torch.load(weights_only=True): a file
        # that pickles anything else is refused there; say which file and why, without torch's advice
        # to retry with weights_only=False (which would run whatever the file asks for)
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            path = self.config[self.config.subcommand].get("ckpt_path")
            asked = re.search(r"GLOBAL (\S+)", str(err))
            what = f"it asks to call {asked.group(1)}" if asked else f"{str(err).splitlines()[0]}"
            raise ValueError(
                f"checkpoint {path} refused: it holds pickled objects other than tensors and plain data "
                f"({what}). xclip reads checkpoints with torch.load(weights_only=True) only, since "
                "unpickling anything else can run code. Pass a checkpoint written by `xclip fit`."
            ) from None

    def _config_summary(self) -> dict[str, Any]:
        cfg = self.config.get(self.subcommand, self.config)
        summary = {}
        for key in ("model", "data", "ckpt_path", "seed_everything"):
            if key in cfg:
                summary[key] = json.loads(json.dumps(cfg[key], default=lambda o: getattr(o, "__dict__", str(o))))
        summary["trainer"] = {
            k: cfg["trainer"].get(k)
            for k in ("accelerator", "devices", "precision", "limit_val_batches", "limit_test_batches")
        }
        return summary

    def before_fit(self) -> None:
        if type(self.model).training_step is pl.LightningModule.training_step:
            raise SystemExit(
                f"xclip: {type(self.model).__name__} is evaluation-only (it has no training step): "
                f"run `xclip validate` or `xclip test` with this config"
            )

    def _after_eval(self, stage: str) -> None:
        if not self.trainer.is_global_zero:
            return
        path = write_results(self.trainer, self.model, stage, self._config_summary())
        metrics = metric_values(self.trainer.callback_metrics)
        rows: list[ReportRow] = self.model.report_rows(metrics) if isinstance(self.model, ReportsResults) else []
        print(f"\nxclip {stage}: results\n{format_report(rows, metrics)}\n")
        print(output_listing(run_directory(self.trainer), path))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.is_global_zero and self.trainer.logger is not None:
                discard_failed_run(run_directory(self.trainer))
            raise

    def after_validate(self) -> None:
        self._after_eval("validate")

    def after_test(self) -> None:
        self._after_eval("test")
