"""The ``xclip`` command: a LightningCLI (fit / validate / test) driven by YAML configs.

After validate and test it writes ``results.json`` (the metrics, anything the module adds through
``extra_results()``, and a summary of the run's config) into the logger's log directory and
prints one report: a table of the results grouped by workflow with full metric names (rows come
from the modules' ``report_rows``), then where everything went (results.json, the TensorBoard
command, explanation folders, plots). Lightning's own per-dataloader tables and tips are off.

``predict`` is not a subcommand: the evaluation modules write their per-item outputs during
validate/test (``per_image.csv``, ``failures.csv``, explanation indexes).

Commands that are not a Lightning loop (``xclip vocab ...``, ``xclip cir-query ...``) are listed in
`COMMANDS` as ``"module:function"`` and imported only when called; each takes its argument list.

Errors end the run with one paragraph, not a chained traceback: a config file that is not valid
YAML is named with the line of the problem; an error raised while building or running the
modules (a missing checkpoint, a corrupt weights file) is reported with xclip's own message, dug
out of the wrappers jsonargparse and Lightning put around it. ``--debug`` (or ``XCLIP_DEBUG=1``)
shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from xclip.engine import ReportsResults
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
            raise ValueError(f"checkpoint {path} refused: it holds pickled objects other than tensors and plain data "
                             f"({what}). xclip reads checkpoints with torch.load(weights_only=True) only, since "
                             "unpickling anything else can run code. Pass a checkpoint written by `xclip fit`."
                             ) from None

    def _config_summary(self) -> dict[str, Any]:
        cfg = self.config.get(self.subcommand, self.config)
        summary = {}
        for key in ("model", "data", "ckpt_path", "seed_everything"):
            if key in cfg:
                summary[key] = json.loads(json.dumps(cfg[key], default=lambda o: getattr(o, "__dict__", str(o))))
        summary["trainer"] = {k: cfg["trainer"].get(k) for k in ("accelerator", "devices", "precision",
                                                                   "limit_val_batches", "limit_test_batches")}
        return summary

    def before_fit(self) -> None:
        if type(self.model).training_step is pl.LightningModule.training_step:
            raise SystemExit(f"xclip: {type(self.model).__name__} is evaluation-only (it has no training step): "
                             f"run `xclip validate` or `xclip test` with this config")

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


# name -> "module:function(argv: list[str]) -> int | None", for commands outside the Lightning loops
COMMANDS: dict[str, str] = {
    "cir-query": "xclip.cir.query_cli:main",
    "vocab": "xclip.ood.cli:main",
    "app": "xclip.faithfulness.app:main",
    "annotations": "xclip.retrieval.cli:main",
}
DEBUG_FLAG, DEBUG_ENV = "--debug", "XCLIP_DEBUG"


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config FILE`` / ``--config=FILE`` (every occurrence)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
    return out


def check_config_files(argv: list[str]) -> None:
    """Raise `SystemExit` naming the file (and line) of a ``--config`` that is missing or not a
    YAML mapping, before jsonargparse reports it as ``<unicode string>`` under its usage text."""
    import yaml

    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"xclip: error: config file {name} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise SystemExit(f"xclip: error: config file {name} is not valid YAML{at}: {problem}") from None
        if data is not None and not isinstance(data, dict):
            raise SystemExit(f"xclip: error: config file {name} must hold a mapping (keys such as model:, data:, "
                             f"trainer:), got a {type(data).__name__}")


def _package_dir() -> Path:
    import xclip

    return Path(xclip.__file__).resolve().parent


def is_own_frame(filename: str, package_dir: Path | None = None) -> bool:
    """Whether a traceback frame's file belongs to the installed xclip package (not merely a path that
    contains a folder named ``xclip``: a clone named so holds its venv and every dependency)."""
    package_dir = package_dir or _package_dir()
    try:
        return Path(filename).resolve().is_relative_to(package_dir)
    except (OSError, ValueError):
        return False


def error_chain(error: BaseException) -> list[BaseException]:
    """The exceptions Python would print for ``error``, outermost first: the explicit ``__cause__``,
    else the implicit ``__context__`` unless the error was raised ``from None``."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            current = None
        else:
            current = current.__context__
    return chain


def root_cause(error: BaseException) -> BaseException:
    """The error a user can act on: the deepest exception of the chain Python would print that was
    raised by xclip's own code (else the deepest one)."""
    chain = error_chain(error)
    package_dir = _package_dir()
    for candidate in reversed(chain):
        frames = traceback.extract_tb(candidate.__traceback__)
        if frames and is_own_frame(frames[-1].filename, package_dir):
            return candidate
    return chain[-1]


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``xclip`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        if argv and argv[0] in COMMANDS:
            module, _, function = COMMANDS[argv[0]].partition(":")
            code = getattr(importlib.import_module(module), function)(argv[1:])
            if code:
                raise SystemExit(code)
            return
        check_config_files(argv)
        quiet_lightning()
        others = ", ".join(f"xclip {name} --help" for name in COMMANDS)
        XClipCLI(save_config_kwargs={"overwrite": True}, args=argv,
                 parser_kwargs={"default_env": False,
                                "description": "xclip: evaluate, explain and fine-tune CLIP-family models "
                                               "(xclip fit|validate|test --config configs/<recipe>.yaml).",
                                "epilog": f"Other commands: {others}. Add {DEBUG_FLAG} (or {DEBUG_ENV}=1) for "
                                          "the full traceback of an error."})
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:
        if debug:
            raise
        cause = root_cause(err)
        raise SystemExit(f"xclip: error: {type(cause).__name__}: {cause}\n"
                         f"(run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the full traceback)") from None


if __name__ == "__main__":
    main()
