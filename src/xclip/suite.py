"""`EvaluationSuite`: several eval-only modules in one ``xclip validate`` run.

Batches are routed to a member module by their ``batch["task"]`` tag (every xclip datamodule
tags its batches), so one config can evaluate zero-shot classification, retrieval and OOD
detection on one pass over the data; each member logs its own metrics and adds its own entry to
``results.json``.

Members that name the same backbone spec hold one model object (they load it through
`xclip.backbones.shared_backbone`), and `backbone_for(batch)` answers with the backbone of the
member a batch is routed to, which is what the explanation callbacks explain it with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from xclip.backbones import Backbone
from xclip.callbacks.explanations import default_explanation_inputs
from xclip.results import ReportRow


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
        """The members' backbone when they all share one; with several, use `backbone_for(batch)`."""
        distinct = {id(b): b for b in self.backbones().values()}
        if len(distinct) > 1:
            raise RuntimeError(f"the suite's members use {len(distinct)} different backbones "
                                 f"({sorted(self.backbone_specs().values())}): ask backbone_for(batch)")
        return next(iter(distinct.values()), None)

    def backbones(self) -> dict[str, Backbone]:
        """member name -> its backbone (members without one are left out)."""
        return {name: m.backbone for name, m in self.members.items() if getattr(m, "backbone", None) is not None}

    def backbone_specs(self) -> dict[str, str]:
        """member name -> the spec of its backbone."""
        return {name: getattr(m, "backbone_spec", "?") for name, m in self.members.items()
                if getattr(m, "backbone", None) is not None}

    def backbone_for(self, batch: dict[str, Any]) -> Backbone | None:
        """The backbone of the member that `batch` is routed to."""
        return getattr(self.member_for(batch), "backbone", None)

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
        member = self.members[self.routes[batch["task"]]] if batch.get("task") in self.routes else None
        picker = getattr(member, "explanation_inputs", None)
        return picker(batch) if picker is not None else default_explanation_inputs(batch)

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Every member's console report rows, in member order (see `xclip.results`)."""
        return [row for m in self.members.values() if hasattr(m, "report_rows") for row in m.report_rows(metrics)]

    def extra_results(self) -> dict[str, Any]:
        """Each member's `extra_results()` under its name, the routes and which members share a
        backbone object."""
        shared: dict[int, list[str]] = {}
        for name, bb in self.backbones().items():
            shared.setdefault(id(bb), []).append(name)
        specs = self.backbone_specs()
        out: dict[str, Any] = {"routes": self.routes,
                               "backbones": [{"spec": specs[names[0]], "members": names} for names in shared.values()]}
        for name, member in self.members.items():
            if hasattr(member, "extra_results"):
                out[name] = member.extra_results()
        return out
