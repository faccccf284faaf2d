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

import torch

from xclip.backbones import Backbone
from xclip.engine import EvaluationModule, ExplanationInputs
from xclip.results import ReportRow


class EvaluationSuite(EvaluationModule):
    """Route each batch to the member module registered for its task.

    Args:
        modules: member name -> an xclip evaluation module (`xclip.engine.EvaluationModule`).
        routes: batch task -> member name (e.g. ``{"classification": "zeroshot", "ood": "ood"}``).
            A batch whose task has no route is an error, never silently skipped.
    """

    workflow = "suite"
    not_hyperparameters = ("modules",)

    def __init__(self, modules: dict[str, EvaluationModule], routes: dict[str, str]):
        super().__init__()
        if not modules:
            raise ValueError("EvaluationSuite needs at least one member module under `modules`")
        foreign = sorted(name for name, m in modules.items() if not isinstance(m, EvaluationModule))
        if foreign:
            raise TypeError(
                f"suite member(s) {foreign} are not xclip evaluation modules "
                "(xclip.engine.EvaluationModule): only those can be routed batches"
            )
        unknown = sorted({m for m in routes.values() if m not in modules})
        if unknown:
            raise ValueError(f"routes name member(s) {unknown} that are not in `modules` {sorted(modules)}")
        unused = sorted(set(modules) - set(routes.values()))
        if unused:
            raise ValueError(f"member(s) {unused} receive no batches: route a task to them under `routes`")
        self.members = torch.nn.ModuleDict(modules)  # registers them: devices, state_dict
        self._members = dict(modules)  # the same modules, typed as what they are
        self.routes = dict(routes)

    @property
    def backbone(self) -> Backbone | None:
        """The members' backbone when they all share one; with several, use `backbone_for(batch)`."""
        distinct = {id(b): b for b in self.backbones().values()}
        if len(distinct) > 1:
            raise RuntimeError(
                f"the suite's members use {len(distinct)} different backbones "
                f"({sorted(self.backbone_specs().values())}): ask backbone_for(batch)"
            )
        return next(iter(distinct.values()), None)

    def backbones(self) -> dict[str, Backbone]:
        """member name -> its backbone (members without one are left out)."""
        found = {name: getattr(m, "backbone", None) for name, m in self._members.items()}
        return {name: bb for name, bb in found.items() if bb is not None}

    def backbone_specs(self) -> dict[str, str]:
        """member name -> the spec of its backbone."""
        return {
            name: getattr(m, "backbone_spec", "?")
            for name, m in self._members.items()
            if getattr(m, "backbone", None) is not None
        }

    def backbone_for(self, batch: Mapping[str, Any]) -> Backbone | None:
        """The backbone of the member that `batch` is routed to."""
        return self.member_for(batch).backbone_for(batch)

    def _attach(self, member: EvaluationModule) -> EvaluationModule:
        """Let a member log through this run: same trainer, same running hook."""
        member._trainer = self._trainer
        member._current_fx_name = self._current_fx_name
        return member

    def _each(self, hook: str, *args: Any) -> None:
        for member in self._members.values():
            getattr(self._attach(member), hook)(*args)

    def member_for(self, batch: Mapping[str, Any]) -> EvaluationModule:
        task = batch.get("task")
        if task not in self.routes:
            raise ValueError(
                f"no member module for batches of task {task!r}: add it under `routes` "
                f"(routed tasks: {sorted(self.routes)})"
            )
        return self._attach(self._members[self.routes[task]])

    # ---- the contract, delegated ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._each("setup", stage)

    def on_validation_start(self) -> None:
        self._each("on_validation_start")

    def on_test_start(self) -> None:
        self._each("on_test_start")

    def start(self, stage: str) -> None:
        self._each("start", stage)

    def step(self, batch: dict[str, Any], stage: str) -> Any:
        member = self.member_for(batch)
        member.check_task(batch)
        return member.step(batch, stage)

    def finish(self, stage: str) -> None:
        self._each("finish", stage)

    def explanation_inputs(self, batch: Mapping[str, Any]) -> ExplanationInputs | None:
        """The routed member's (see `xclip.callbacks.explanations`)."""
        return self.member_for(batch).explanation_inputs(batch) if batch.get("task") in self.routes else None

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Every member's console report rows, in member order (see `xclip.results`)."""
        return [row for m in self._members.values() for row in m.report_rows(metrics)]

    def extra_results(self) -> dict[str, Any]:
        """Each member's `extra_results()` under its name, the routes and which members share a
        backbone object."""
        shared: dict[int, list[str]] = {}
        for name, bb in self.backbones().items():
            shared.setdefault(id(bb), []).append(name)
        specs = self.backbone_specs()
        out: dict[str, Any] = {
            "routes": self.routes,
            "backbones": [{"spec": specs[names[0]], "members": names} for names in shared.values()],
        }
        for name, member in self._members.items():
            out[name] = member.extra_results()
        return out
