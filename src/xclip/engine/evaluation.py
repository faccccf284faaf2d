"""The evaluation contract every xclip LightningModule follows (anomalib's one-base-module idea).

`EvaluationModule` turns Lightning's hooks into three methods a workflow writes:

- ``start(stage)`` at the start of a validate/test epoch (build zero-shot heads, reset state);
- ``step(batch, stage)`` for every batch (``validation_step`` and ``test_step`` both call it, after
  checking that ``batch["task"]`` is one of the module's `tasks`); what it returns reaches the
  callbacks as ``outputs``;
- ``finish(stage)`` at the end of the epoch: gather, de-duplicate by item index, score, log.

Metrics are logged under one key scheme, ``{stage}/{workflow}/{name}`` (`metric_key`), so members
of an `EvaluationSuite` never collide. What the CLI reads after a run is typed by `ReportsResults`:
``report_rows(metrics)`` (the console table), ``extra_results()`` (merged into results.json) and
``explanation_inputs(batch)`` (what the explanation callbacks explain). Hyperparameters are saved
one way: the base calls ``save_hyperparameters`` with the subclass's constructor arguments, leaving
out `not_hyperparameters` and models passed as objects.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor, nn

from xclip.results import ReportRow

ExplanationInputs = tuple[Tensor, list[str], list[str]]  # images01 [n, 3, H, W], one text per image, item ids
STAGES = ("val", "test")


def default_explanation_inputs(batch: Mapping[str, Any]) -> ExplanationInputs | None:
    """(images, one text per image, ids) of a ShapesWorld-style batch: its ``caption``, or each
    image's first caption in ``texts``; None when the batch has no images or no texts."""
    images = batch.get("image")
    if images is None:
        return None
    if "caption" in batch:
        texts = list(batch["caption"])
    elif "texts" in batch and "text_to_image" in batch:
        first: dict[int, str] = {}
        for t, i in enumerate(batch["text_to_image"].tolist()):
            first.setdefault(i, batch["texts"][t])
        texts = [first[i] for i in range(images.shape[0])]
    else:
        return None
    index = batch.get("index")
    ids = [str(int(i)) for i in index] if index is not None else [str(i) for i in range(images.shape[0])]
    return images, texts, ids


@runtime_checkable
class ReportsResults(Protocol):
    """What the CLI, results.json and the explanation callbacks read from a module after a run."""

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]: ...

    def extra_results(self) -> dict[str, Any]: ...

    def explanation_inputs(self, batch: Mapping[str, Any]) -> ExplanationInputs | None: ...

    def backbone_for(self, batch: Mapping[str, Any]) -> Any: ...


class EvaluationModule(pl.LightningModule):
    """Base of every xclip LightningModule that validates or tests (see the module docstring).

    Class attributes a workflow sets:
        workflow: the metric namespace (``zeroshot``, ``retrieval``, ``ood``, ``cir``,
            ``faithfulness``, ``distill``...).
        tasks: the ``batch["task"]`` values `step` accepts (empty: any).
        not_hyperparameters: constructor arguments left out of the saved hyperparameters (besides
            any argument passed as an ``nn.Module``, such as a `Backbone` object: a spec string stays).
    """

    workflow: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()
    not_hyperparameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        # The subclasses' constructor arguments, read from their __init__ frames. Passed explicitly:
        # LightningCLI hands a module the config of the class it instantiates, which for a member
        # built inside an EvaluationSuite would be the suite's.
        frame = inspect.currentframe()
        arguments: dict[str, Any] = {}
        if frame is not None:
            for local in collect_init_args(frame, [], classes=(EvaluationModule,)):
                arguments.update(local)
        del frame
        kept = {
            k: v for k, v in arguments.items() if k not in self.not_hyperparameters and not isinstance(v, nn.Module)
        }
        # `_class_path` is how LightningCLI re-applies a checkpoint's hyperparameters (``--ckpt_path``)
        self.save_hyperparameters({"_class_path": f"{type(self).__module__}.{type(self).__qualname__}", **kept})

    # ---- what a workflow writes -------------------------------------------------------------
    def start(self, stage: str) -> None:
        """Called at the start of every validate/test epoch (`stage` is ``val`` or ``test``)."""

    def step(self, batch: dict[str, Any], stage: str) -> Any:
        """Evaluate one batch; the return value reaches the callbacks as ``outputs``."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(batch, stage)")

    def finish(self, stage: str) -> None:
        """Called at the end of every validate/test epoch: score what `step` collected and log it."""

    # ---- what the CLI reads ---------------------------------------------------------------------
    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Console report rows for this module's logged metrics (unclaimed keys are listed as "other")."""
        return []

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json (under the member's name inside a suite)."""
        spec = getattr(self, "backbone_spec", None)
        return {"backbone": spec} if spec is not None else {}

    def explanation_inputs(self, batch: Mapping[str, Any]) -> ExplanationInputs | None:
        """The images, texts and ids the explanation callbacks explain for `batch`."""
        return default_explanation_inputs(batch)

    def backbone_for(self, batch: Mapping[str, Any]) -> Any:
        """The backbone that scored `batch` (what the explanation callbacks explain it with); None
        for a module without one."""
        return getattr(self, "backbone", None)

    # ---- helpers ------------------------------------------------------------------------------------
    def metric_key(self, stage: str, name: str) -> str:
        """``{stage}/{workflow}/{name}``: the one key scheme of every logged metric."""
        return f"{stage}/{self.workflow}/{name}"

    def log_metric(self, stage: str, name: str, value: Any, **kwargs: Any) -> None:
        """``self.log`` under `metric_key`. Values computed from gathered, de-duplicated tables are
        identical on every process: pass ``sync_dist=False`` (the default here) for those."""
        kwargs.setdefault("sync_dist", False)
        self.log(self.metric_key(stage, name), value, **kwargs)

    def logged(self, metrics: Mapping[str, float | None], stage: str, name: str) -> float | None:
        """The value of this module's metric `name` in `metrics` (None when not logged)."""
        return metrics.get(self.metric_key(stage, name))

    def check_task(self, batch: Mapping[str, Any]) -> None:
        task = batch.get("task")
        if self.tasks and task not in self.tasks:
            raise ValueError(
                f"{type(self).__name__} evaluates batches of task {' or '.join(map(repr, self.tasks))}, "
                f"got {task!r}: route that task to another module (EvaluationSuite `routes`)"
            )

    # ---- Lightning's hooks, written once --------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Any:
        self.check_task(batch)
        return self.step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Any:
        self.check_task(batch)
        return self.step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.start("val")

    def on_test_epoch_start(self) -> None:
        self.start("test")

    def on_validation_epoch_end(self) -> None:
        self.finish("val")

    def on_test_epoch_end(self) -> None:
        self.finish("test")
