"""Per-task macro F1, accuracy and one-vs-rest AUROC of a multi-task classifier as one TorchMetrics
`Metric`: it keeps one row per item (class probabilities and labels of every task, keyed by the
item's index) and scores the de-duplicated rows, so several processes give exactly the numbers
of one (a ``DistributedSampler`` repeats items to even out the processes)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc, multiclass_f1_score

from xclip.metrics import ScoreTable


class MultitaskClassificationMetrics(ScoreTable):
    """``update_batch(probs {task: [B, K]}, labels {task: [B]}, index [B])``; `scores()` ->
    ``{"<task>_macro_f1", "<task>_acc", "<task>_auroc", ..., "mean_macro_f1"}``.

    accuracy = top-1 over items (micro); macro F1 = the unweighted mean of the per-class F1;
    AUROC = the mean over classes of each class against the rest (classes absent from the labels
    are left out of that mean).
    """

    def __init__(self, tasks: Mapping[str, int], **kwargs):
        self.tasks = {str(t): int(k) for t, k in tasks.items()}
        self._prob_columns = {t: tuple(f"p{i}_{c}" for c in range(k)) for i, (t, k) in enumerate(self.tasks.items())}
        self._label_columns = {t: f"label{i}" for i, t in enumerate(self.tasks)}
        super().__init__(tuple(c for cols in self._prob_columns.values() for c in cols),
                         tuple(self._label_columns.values()) + ("index",), unique_by=("index",), **kwargs)

    def update_batch(self, probs: Mapping[str, Tensor], labels: Mapping[str, Tensor], index: Tensor) -> None:
        columns = {"index": index}
        for task, k in self.tasks.items():
            p = probs[task]
            if p.ndim != 2 or p.shape[1] != k:
                raise ValueError(f"task {task!r}: probabilities must be [B, {k}], got {tuple(p.shape)}")
            columns.update({name: p[:, c] for c, name in enumerate(self._prob_columns[task])})
            columns[self._label_columns[task]] = labels[task]
        self.update(**columns)

    def scores(self) -> dict[str, float]:
        """Every task's macro F1, accuracy and OvR AUROC, and the mean macro F1 over the tasks."""
        rows = self.rows()
        out: dict[str, float] = {}
        for task, k in self.tasks.items():
            probs = torch.stack([rows[c] for c in self._prob_columns[task]], dim=1).float()
            target = rows[self._label_columns[task]]
            if target.numel() == 0:
                raise ValueError("no items were scored: the evaluation saw no readable item")
            out[f"{task}_macro_f1"] = float(multiclass_f1_score(probs, target, k, average="macro"))
            out[f"{task}_acc"] = float(multiclass_accuracy(probs, target, k, average="micro"))
            present = torch.bincount(target, minlength=k) > 0
            per_class = multiclass_auroc(probs, target, k, average="none")
            out[f"{task}_auroc"] = float(per_class[present].mean())
        out["mean_macro_f1"] = sum(out[f"{t}_macro_f1"] for t in self.tasks) / len(self.tasks)
        out["n_items"] = float(rows["index"].numel())
        return out
