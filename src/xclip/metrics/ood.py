"""Zero-shot OOD detection metrics: AUROC, FPR at 95% TPR, AUPR-IN and AUPR-OUT.

Scores follow one rule everywhere: a higher score means "more in-distribution". Two FPR95
conventions are in use and they measure different things, so the convention is an argument:

- ``"neglabel"`` (default; NegLabel, MCM, NegRefine): ID is the positive class. FPR95 is the share
  of OOD samples accepted at the threshold whose ID recall is NEAREST to 0.95. This reproduces
  ``fpr_and_fdr_at_recall(labels, examples, recall_level=0.95)`` of NegLabel's
  ``mmcls/utils/ood_evaluate.py`` (XueJiang16/NegLabel; MCM's ``utils/detection_util.py`` has the
  same function behind ``get_measures``) exactly, including its tie rule: among thresholds at the
  same distance from 0.95 it takes the lowest one, so on a run of OOD-only thresholds at that
  recall it counts every OOD sample of the run.
- ``"openood"``: OOD is the positive class (scores negated). FPR95 is the share of ID samples
  rejected at the FIRST threshold where the OOD TPR reaches 0.95, taken over every distinct
  threshold. OpenOOD's ``auc_and_fpr_recall`` reads it off ``roc_curve(drop_intermediate=True)``,
  which can skip a threshold inside a diagonal run of tied scores; without ties both agree.

AUROC and AUPR are the same under both conventions: AUPR-IN is the average precision with ID
positive, AUPR-OUT the average precision with OOD positive on negated scores (scikit-learn's
``average_precision_score``, as NegLabel uses; OpenOOD integrates the PR curve by trapezoids instead,
which is not reproduced). Counts are exact integers; ties share one threshold.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from xclip.metrics.score_table import unique_rows

Convention = Literal["neglabel", "openood"]
_CONVENTIONS = ("neglabel", "openood")


def _as_scores(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    """Flat float64 copy of `x`; raises on empty input or NaN (NaN cannot be ranked)."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives accepted at each distinct threshold, thresholds descending.

    A sample is accepted when its score is >= the threshold, so tied scores enter together.
    Returns ``(tps [T], fps [T])`` int64; the last entry accepts everything.
    """
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    # last position of each run of equal scores (compared with !=, so +-inf runs stay together)
    ends = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1]
    tps = np.cumsum(is_pos)[ends]
    return tps, ends + 1 - tps


def _auroc(tps: np.ndarray, fps: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids, so a tie counts one half), summed in integers."""
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    prev_tps = np.r_[0, tps[:-1]]
    twice_area = int(np.sum(np.diff(np.r_[0, fps]) * (prev_tps + tps)))
    return twice_area / (2 * n_pos * n_neg)


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    """sum_k (R_k - R_{k-1}) P_k over thresholds: scikit-learn's ``average_precision_score``."""
    gained = np.diff(np.r_[0, tps])
    return float(np.sum(gained * (tps / (tps + fps))) / tps[-1])


def fpr_at_tpr(
    pos_scores: Tensor | np.ndarray,
    neg_scores: Tensor | np.ndarray,
    tpr: float = 0.95,
    rule: Literal["nearest", "first_geq"] = "nearest",
) -> float:
    """Share of negatives scoring >= the threshold picked on the positives' TPR (higher = positive).

    ``rule="nearest"``: among thresholds down to the first that accepts every positive, the one whose
    TPR is nearest to `tpr`; among equally near ones the lowest threshold (NegLabel/MCM
    ``fpr_and_fdr_at_recall``). ``rule="first_geq"``: the highest threshold whose TPR is >= `tpr`.
    """
    pos = _as_scores(pos_scores, "pos_scores")
    neg = _as_scores(neg_scores, "neg_scores")
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    tps, fps = _counts(pos, neg)
    recall = tps / pos.size
    if rule == "nearest":
        last = int(np.searchsorted(tps, pos.size))  # first threshold accepting every positive
        distance = np.abs(recall[: last + 1] - tpr)
        # argmin returns the first minimum: scanning from the lowest threshold up, as the reference does
        cut = last - int(np.argmin(distance[::-1]))
    elif rule == "first_geq":
        cut = int(np.argmax(recall >= tpr))  # the last threshold has recall 1, so one always exists
    else:
        raise ValueError(f"rule must be 'nearest' or 'first_geq', got {rule!r}")
    return float(fps[cut] / neg.size)


def ood_metrics(
    id_scores: Tensor | np.ndarray, ood_scores: Tensor | np.ndarray, convention: Convention = "neglabel"
) -> dict[str, float]:
    """``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` in [0, 1] from raw scores (higher = more ID).

    `id_scores` [N_id] and `ood_scores` [N_ood] are tensors or arrays of any real range; only their
    order matters. `convention` picks the FPR95 definition (see the module docstring).
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    tps, fps = _counts(id_s, ood_s)
    out_tps, out_fps = _counts(-ood_s, -id_s)  # OOD as the positive class
    if convention == "neglabel":
        fpr95 = fpr_at_tpr(id_s, ood_s, 0.95, "nearest")
    else:
        fpr95 = fpr_at_tpr(-ood_s, -id_s, 0.95, "first_geq")
    return {
        "auroc": _auroc(tps, fps),
        "fpr95": fpr95,
        "aupr_in": _average_precision(tps, fps),
        "aupr_out": _average_precision(out_tps, out_fps),
    }


def roc_curve(id_scores: Tensor | np.ndarray, ood_scores: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC with ID positive: ``(fpr [T+1], tpr [T+1])`` from (0, 0), one point per distinct threshold
    (descending), tied scores entering together; the trapezoid area under it is ``ood_metrics``' AUROC."""
    tps, fps = _counts(_as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores"))
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


class OODMetrics(Metric):
    """Accumulates raw OOD scores and ID flags; `compute` returns :func:`ood_metrics` of all of them.

    ``update(scores [B], is_id [B] bool, index [B])``: `index` identifies the item within its set
    (ID and OOD indices may overlap); items are de-duplicated by (is_id, index) before scoring, so
    the padded repeats of a ``DistributedSampler`` count once and several processes give exactly
    the single-process numbers. Scores are kept raw: torchmetrics' binary metrics would apply a
    sigmoid to any batch outside [0, 1], decided per update, which breaks the ranking.
    """

    is_differentiable = False
    full_state_update = False
    scores: list[Tensor]  # [B] float64 per update
    is_id: list[Tensor]  # [B] uint8
    index: list[Tensor]  # [B] int64

    def __init__(self, convention: Convention = "neglabel", **kwargs):
        super().__init__(**kwargs)
        if convention not in _CONVENTIONS:
            raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
        self.convention = convention
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_id", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_id: Tensor, index: Tensor) -> None:
        if scores.ndim != 1 or scores.shape != is_id.shape or scores.shape != index.shape:
            raise ValueError(
                f"scores, is_id and index must all be [B], got {tuple(scores.shape)}, "
                f"{tuple(is_id.shape)} and {tuple(index.shape)}"
            )
        # float64 keeps distinct float64 scores distinct; uint8 flags gather on every backend
        self.scores.append(scores.detach().to(torch.float64))
        self.is_id.append(is_id.detach().to(torch.uint8))
        self.index.append(index.detach().to(torch.int64))

    def compute(self) -> dict[str, float]:
        rows = unique_rows(
            {
                "scores": dim_zero_cat(self.scores),
                "is_id": dim_zero_cat(self.is_id).long(),
                "index": dim_zero_cat(self.index),
            },
            ("is_id", "index"),
        )
        is_id = rows["is_id"].bool()
        return ood_metrics(rows["scores"][is_id], rows["scores"][~is_id], self.convention)
