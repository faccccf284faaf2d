"""Per-task macro F1, accuracy and one-vs-rest AUROC of a multi-task classifier as one TorchMetrics
`Metric`: it keeps one row per item (class probabilities and labels of every task, keyed by the
item's index) and scores the de-duplicated rows, so several processes give exactly the numbers
of one (a ``DistributedSampler`` repeats items to even out the processes).

One-vs-rest AUROC needs, for each class, items of that class and items of others: when the
evaluated items hold a single class of a task it is undefined, reported as NaN (never 0, which
torchmetrics returns for a class without negatives) with the reason in `notes`. NaN probabilities
are refused: they cannot be ranked, and would be scored as some class silently."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multilabel_auroc

from xclip.metrics import ScoreTable


class MultitaskClassificationMetrics(ScoreTable):
    """``update_batch(probs {task: [B, K]}, labels {task: [B]}, index [B])``; `scores()` ->
    ``{"<task>_macro_f1", "<task>_acc", "<task>_auroc", ..., "mean_macro_f1"}``.

    accuracy = top-1 over items (micro); macro F1 = the unweighted mean of the per-class F1 over the
    classes that occur in the labels or the predictions (scikit-learn's ``f1_score(average="macro")``);
    AUROC = the mean over the classes present in the labels of each class against the rest (NaN
    when only one class is present: see `notes`).
    """

    def __init__(self, tasks: Mapping[str, int], class_names: Mapping[str, Sequence[str]] | None = None, **kwargs):
        self.tasks = {str(t): int(k) for t, k in tasks.items()}
        self.class_names = {t: [str(c) for c in (class_names or {}).get(t, range(k))] for t, k in self.tasks.items()}
        self._prob_columns = {t: tuple(f"p{i}_{c}" for c in range(k)) for i, (t, k) in enumerate(self.tasks.items())}
        self._label_columns = {t: f"label{i}" for i, t in enumerate(self.tasks)}
        super().__init__(
            tuple(c for cols in self._prob_columns.values() for c in cols),
            tuple(self._label_columns.values()) + ("index",),
            unique_by=("index",),
            **kwargs,
        )
        self.notes: dict[str, str] = {}

    def update_batch(self, probs: Mapping[str, Tensor], labels: Mapping[str, Tensor], index: Tensor) -> None:
        columns = {"index": index}
        for task, k in self.tasks.items():
            p = probs[task]
            if p.ndim != 2 or p.shape[1] != k:
                raise ValueError(f"task {task!r}: probabilities must be [B, {k}], got {tuple(p.shape)}")
            bad = torch.isnan(p).any(1)
            if bad.any():
                raise ValueError(
                    f"task {task!r}: the class probabilities of items {index[bad].tolist()[:10]} are NaN "
                    "(the model's outputs are NaN: check the inputs, the weights and the precision); "
                    "NaN outputs cannot be scored"
                )
            columns.update({name: p[:, c] for c, name in enumerate(self._prob_columns[task])})
            columns[self._label_columns[task]] = labels[task]
        self.update(**columns)

    def scores(self) -> dict[str, float]:
        """Every task's macro F1, accuracy and OvR AUROC, and the mean macro F1 over the tasks; `notes`
        says why a value is NaN (``{"<task>_auroc": reason}``)."""
        rows = self.rows()
        out: dict[str, float] = {}
        self.notes = {}
        for task, k in self.tasks.items():
            probs = torch.stack([rows[c] for c in self._prob_columns[task]], dim=1).float()
            target = rows[self._label_columns[task]]
            if target.numel() == 0:
                raise ValueError("no items were scored: the evaluation saw no readable item")
            out[f"{task}_macro_f1"] = float(multiclass_f1_score(probs, target, k, average="macro"))
            out[f"{task}_acc"] = float(multiclass_accuracy(probs, target, k, average="micro"))
            out[f"{task}_auroc"] = ovr_auroc(probs, target)
            if math.isnan(out[f"{task}_auroc"]):
                only = self.class_names[task][int(target[0])]
                self.notes[f"{task}_auroc"] = (
                    f"undefined: all {target.numel()} evaluated items are {only!r}; "
                    "one-vs-rest AUROC needs items of two classes or more"
                )
        out["mean_macro_f1"] = sum(out[f"{t}_macro_f1"] for t in self.tasks) / len(self.tasks)
        out["n_items"] = float(rows["index"].numel())
        return out


def ovr_auroc(probs: Tensor, target: Tensor) -> float:
    """Mean over the classes present in `target` [N] of the AUROC of ``probs[:, c]`` [N, K] for class c
    against the rest; NaN when fewer than two classes are present (no class has both positives and
    negatives). Only the defined per-class values are computed, so torchmetrics has nothing to warn about."""
    present = torch.bincount(target, minlength=probs.shape[1]) > 0
    n_present = int(present.sum())
    if n_present < 2:
        return float("nan")
    onehot = F.one_hot(target, probs.shape[1])[:, present]
    return float(multilabel_auroc(probs[:, present], onehot, num_labels=n_present, average="macro"))
