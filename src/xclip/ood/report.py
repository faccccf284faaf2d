"""What `NegAlignModule` reports after its pass: metrics of every variant and lambda, per-split
statistics, the lambda-sweep and ROC figures, the per-image breakdown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from xclip.io import atomic_write_csv
from xclip.metrics.ood import Convention, ood_metrics, roc_curve
from xclip.ood.negalign_sweep import Variant, variant_scores

Terms = dict[str, Tensor]
SplitMetrics = dict[str, dict[str, float]]  # OOD split name -> {"auroc", "fpr95", "aupr_in", "aupr_out"}


def variant_metrics(
    terms: Terms,
    is_id: Tensor,
    ood_masks: dict[str, Tensor],
    variant: Variant,
    lam: float,
    stats: dict | None,
    convention: Convention,
) -> SplitMetrics:
    """OOD metrics of `variant` at `lam` for each OOD split (ID rows `is_id` [N] against each mask [N])."""
    scores = variant_scores(terms, variant, lam, stats)
    return {name: ood_metrics(scores[is_id], scores[mask], convention) for name, mask in ood_masks.items()}


def mean_auroc(metrics: SplitMetrics) -> float:
    return float(np.mean([m["auroc"] for m in metrics.values()]))


def split_statistics(
    rows: dict[str, Tensor], names: dict[int, tuple[str, str]], skipped: dict[int, int], columns: dict[str, Tensor]
) -> dict[str, dict[str, float | int | str]]:
    """Per split: role, image count, skipped images, the mean of each of `columns` [N], CAM valid
    rate, background fall-back rate and (where labels exist) zero-shot ID accuracy."""
    out = {}
    for code, (name, role) in names.items():
        sel = rows["split"] == code
        n = int(sel.sum())
        stats: dict[str, float | int | str] = {"role": role, "n": n, "skipped": int(skipped.get(code, 0))}
        if n:
            stats.update({f"mean_{k}": float(v[sel].double().mean()) for k, v in columns.items()})
            stats["cam_valid_rate"] = float(rows["cam_valid"][sel].double().mean())
            stats["bg_fell_back_rate"] = float(rows["bg_fell_back"][sel].double().mean())
            labelled = sel & (rows["label"] >= 0)
            if labelled.any():
                stats["id_accuracy"] = float((rows["pred_class"][labelled] == rows["label"][labelled]).double().mean())
        out[name] = stats
    return out


def sweep_figure(lambdas: Sequence[float], per_lambda: list[SplitMetrics], title: str) -> Figure:
    """AUROC and FPR95 against lambda, one line per OOD split."""
    fig = Figure(figsize=(8, 3.4), dpi=100)
    axes = fig.subplots(1, 2)
    x = np.arange(len(lambdas))
    for split in per_lambda[0]:
        for ax, key in zip(axes, ("auroc", "fpr95")):
            ax.plot(x, [m[split][key] for m in per_lambda], marker="o", label=split)
    for ax, key in zip(axes, ("AUROC", "FPR95")):
        ax.set_xticks(x, [f"{v:g}" for v in lambdas])
        ax.set_xlabel("lambda")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def roc_figure(curves: dict[str, dict[str, tuple[Tensor, Tensor]]]) -> Figure:
    """One ROC panel per OOD split (ID positive), one line per variant: ``curves[variant][split]``
    holds ``(id_scores, ood_scores)``."""
    splits = list(next(iter(curves.values())))
    fig = Figure(figsize=(4 * len(splits), 3.6), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(splits)))
    for ax, split in zip(axes, splits):
        for label, per_split in curves.items():
            id_s, ood_s = per_split[split]
            fpr, tpr = roc_curve(id_s, ood_s)
            ax.plot(fpr, tpr, label=f"{label} ({ood_metrics(id_s, ood_s)['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("FPR (OOD accepted)")
        ax.set_ylabel("TPR (ID accepted)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


BREAKDOWN_COLUMNS = (
    "split",
    "role",
    "index",
    "status",
    "path",
    "label",
    "s_neglabel_plain",
    "s_neglabel_star",
    "p_align",
    "s_final",
    "pred_class",
    "pred_class_name",
    "cam_valid",
)


def write_breakdown(
    path: Path,
    rows: dict[str, Tensor],
    names: dict[int, tuple[str, str]],
    scores: dict[str, Tensor],
    class_names: Sequence[str],
    unreadable: Sequence[tuple[int, int, str]] = (),
) -> Path:
    """The per-image CSV: split, role, dataset index, status (``scored`` / ``unreadable``), label,
    the four scores of the configured variant (`scores`: s_neglabel_plain, s_neglabel_star,
    p_align, s_final), prediction, CAM valid; `unreadable` (split code, index, path) rows carry
    their file path and no scores."""
    cols = {k: v.tolist() for k, v in {**rows, **scores}.items()}
    records = []
    for i, code in enumerate(cols["split"]):
        name, role = names[code]
        record = {k: cols[k][i] for k in BREAKDOWN_COLUMNS if k in cols and k != "split"}
        record.update(
            split=name,
            role=role,
            status="scored",
            pred_class_name=class_names[cols["pred_class"][i]],
            cam_valid=bool(cols["cam_valid"][i]),
        )
        records.append(record)
    for code, index, file in unreadable:
        name, role = names[code]
        records.append({"split": name, "role": role, "index": index, "status": "unreadable", "path": file})
    return atomic_write_csv(path, BREAKDOWN_COLUMNS, records)
