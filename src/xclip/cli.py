"""The ``xclip`` command: a LightningCLI (fit / validate / test / predict) driven by YAML configs.

After validate and test it writes ``results.json`` (the metrics, anything the module adds through
``extra_results()``, and a summary of the run's config) into the logger's log directory and
prints where it wrote.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lightning.pytorch.cli import LightningCLI

from xclip.results import write_results


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
