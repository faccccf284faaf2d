"""`EvaluationSuite`: several eval-only modules in one ``xclip validate`` run.

Batches are routed to a member module by their ``batch["task"]`` tag (every xclip datamodule
tags its batches), so one config can evaluate zero-shot classification, retrieval and OOD
detection on one pass over the data; each member logs its own metrics and adds its own entry to
``results.json``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from xclip.backbones import Backbone

class EvaluationSuite(pl.LightningModule):
    """Route each batch to the member module registered for its task.

    Args:
        modules: member name -> an eval-only xclip LightningModule.
        routes: batch task -> member name (e.g. ``{"classification": "zeroshot", "ood": "ood"}``).
            A batch whose task has no route is an error, never silently skipped.
    """

    def __init__(self, modules: dict[str, pl.LightningModule], routes: dict[str, str]):
        super().__init__()
        if not modules:
            raise ValueError("EvaluationSuite needs at least one member module under `modules`")
        unknown = sorted({m for m in routes.values() if m not in modules})
        if unknown:
            raise ValueError(f"routes name member(s) {unknown} that are not in `modules` {sorted(modules)}")
        unused = sorted(set(modules) - set(routes.values()))
        if unused:
            raise ValueError(f"member(s) {unused} receive no batches: route a task to them under `routes`")
        self.members = torch.nn.ModuleDict(modules)
        self.routes = dict(routes)

    @property
    def backbone(self) -> Backbone | None:
        """The first member's backbone (what the explanation callbacks explain)."""
        for member in self.members.values():
            if getattr(member, "backbone", None) is not None:
                return member.backbone
        return None

    def _attach(self, member: pl.LightningModule) -> pl.LightningModule:
        """Let a member log through this run: same trainer, same running hook."""
        member._trainer = self._trainer
        member._current_fx_name = self._current_fx_name
        return member

    def _each(self, hook: str, *args: Any) -> None:
        for member in self.members.values():
            getattr(self._attach(member), hook)(*args)

    def setup(self, stage: str) -> None:
        self._each("setup", stage)

    def on_validation_start(self) -> None:
        self._each("on_validation_start")

    def on_validation_epoch_start(self) -> None:
        self._each("on_validation_epoch_start")

    def on_validation_epoch_end(self) -> None:
        self._each("on_validation_epoch_end")

    def on_test_start(self) -> None:
        self._each("on_test_start")

    def on_test_epoch_start(self) -> None:
        self._each("on_test_epoch_start")

    def on_test_epoch_end(self) -> None:
        self._each("on_test_epoch_end")

    def member_for(self, batch: dict[str, Any]) -> pl.LightningModule:
        task = batch.get("task")
        if task not in self.routes:
            raise ValueError(f"no member module for batches of task {task!r}: add it under `routes` "
                             f"(routed tasks: {sorted(self.routes)})")
        return self._attach(self.members[self.routes[task]])

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.member_for(batch).validation_step(batch, batch_idx, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.member_for(batch).test_step(batch, batch_idx, dataloader_idx)

    def explanation_inputs(self, batch: dict[str, Any]):
        """Delegates to the batch's member (see `xclip.callbacks.explanations`)."""
        from xclip.callbacks.explanations import default_explanation_inputs

        member = self.members[self.routes[batch["task"]]] if batch.get("task") in self.routes else None
        picker = getattr(member, "explanation_inputs", None)
        return picker(batch) if picker is not None else default_explanation_inputs(batch)

    def extra_results(self) -> dict[str, Any]:
        """Each member's `extra_results()` under its name, and the routes."""
        out: dict[str, Any] = {"routes": self.routes}
        for name, member in self.members.items():
            if hasattr(member, "extra_results"):
                out[name] = member.extra_results()
        return out
