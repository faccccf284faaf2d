"""NegLabel / NegAlign evaluation from the per-image terms of one pass: every variant, the lambda
sweep, the lambda chosen on validation data, the oracle lambda and the M1/M2/M3/P_align ablation.

Plain functions over the gathered score table (`xclip.metrics.ScoreTable` rows: one row per image
with its ``split`` code, item ``index`` and the terms of `xclip.ood.negalign_sweep.TERM_COLUMNS`);
`NegAlignModule` gathers the rows and logs / writes what `evaluate` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xclip.metrics.ood import Convention
from xclip.ood.negalign_sweep import ALL_VARIANTS, TERM_COLUMNS, Variant, variant_scores, zscore_stats, zscored
from xclip.ood.report import SplitMetrics, mean_auroc, variant_metrics

Splits = dict[int, tuple[str, str, str]]  # split code -> (partition, name, role), in order of appearance


def in_set_order(rows: dict[str, Tensor], splits: Splits) -> dict[str, Tensor]:
    """Rows sorted by set (in the order the sets arrived) then item index: the same order whatever
    the number of processes that scored them."""
    rank = {code: i for i, code in enumerate(splits)}
    set_rank = torch.tensor([rank.get(int(c), len(rank)) for c in rows["split"].tolist()], dtype=torch.long)
    order = torch.argsort(rows["index"], stable=True)
    order = order[torch.argsort(set_rank[order], stable=True)]
    return {k: v[order] for k, v in rows.items()}


def report_names(splits: Splits, evaluated: str) -> dict[int, tuple[str, str]]:
    """code -> (report name, role): the evaluated partition's sets keep their names, the
    lambda-selection sets of a test run are prefixed ``val/``."""
    return {
        c: (name if part == evaluated or role == "calib" else f"{part}/{name}", role)
        for c, (part, name, role) in splits.items()
    }


def set_masks(rows: dict[str, Tensor], splits: Splits, partition: str) -> tuple[Tensor, dict[str, Tensor]]:
    """(ID rows [N] bool, OOD set name -> rows [N] bool) of one partition."""
    codes = {c: (name, role) for c, (part, name, role) in splits.items() if part == partition}
    id_codes = [c for c, (_, role) in codes.items() if role == "id"]
    ood_codes = [c for c, (_, role) in codes.items() if role == "ood"]
    if len(id_codes) != 1 or not ood_codes:
        raise ValueError(
            f"OOD evaluation needs exactly one ID split and at least one OOD split in the "
            f"{partition!r} partition, got {sorted(codes.values())}"
        )
    return rows["split"] == id_codes[0], {codes[c][0]: rows["split"] == c for c in ood_codes}


@dataclass
class OODEvaluation:
    """What one pass measured (every metric dict is ``{ood split: {"auroc", "fpr95", "aupr_in", "aupr_out"}}``).

    Attributes:
        variants: ``neglabel``, ``neglabel_star``, ``negalign`` (configured lambda) and
            ``negalign_selected`` (the lambda chosen on validation data) -> metrics.
        per_lambda: the configured variant's metrics at each lambda of the sweep.
        best, oracle: indices into the sweep: chosen on validation data / on the reported data.
        ablation: one entry per available M1/M2/M3/P_align combination, with its own sweep.
        configured: per-image scores of the configured run (``s_neglabel_plain``,
            ``s_neglabel_star``, ``p_align``, ``s_final``) [N].
        star: the configured variant without P_align (NegLabel*).
        stats: the z-score statistics of the calibration images (None without them).
    """

    variants: dict[str, SplitMetrics]
    per_lambda: list[SplitMetrics]
    best: int
    oracle: int
    ablation: list[dict[str, Any]]
    configured: dict[str, Tensor]
    star: Variant
    stats: dict[str, tuple[float, float]] | None


def evaluate(
    rows: dict[str, Tensor],
    splits: Splits,
    evaluated: str,
    variant: Variant,
    lam: float,
    lambdas: Sequence[float],
    convention: Convention,
    available: Callable[[Variant], bool],
) -> OODEvaluation:
    """Score every variant and lambda from the per-image terms in `rows` (see the module docstring).

    The lambda of ``negalign_selected`` is the one with the highest mean AUROC over the OOD sets of
    the ``val`` partition (the same data as the report in a validate run; the validation sets a
    test run also scored otherwise); ``oracle`` is chosen on the reported data itself.
    """
    names = report_names(splits, evaluated)
    is_id, ood_masks = set_masks(rows, splits, evaluated)
    sel_id, sel_ood = set_masks(rows, splits, "val")
    terms = {c: rows[c] for c in TERM_COLUMNS}
    calib_codes = [c for c, (_, role) in names.items() if role == "calib"]
    calib = rows["split"] == calib_codes[0] if calib_codes else None
    stats = zscore_stats({c: v[calib] for c, v in terms.items()}) if calib is not None and calib.any() else None
    if variant.m3 and stats is None:
        raise ValueError(
            "m3 is on but no ID calibration images were evaluated: give the datamodule a "
            "calibration set (n_calib > 0 / calib_split) or set m3 false"
        )

    def metrics(v: Variant, at: float, id_rows: Tensor = is_id, ood: dict[str, Tensor] = ood_masks) -> SplitMetrics:
        return variant_metrics(terms, id_rows, ood, v, at, stats, convention)

    star = Variant(variant.m1, variant.m2, variant.m3, False)
    per_lambda = [metrics(variant, x) for x in lambdas]
    on_val = per_lambda if evaluated == "val" else [metrics(variant, x, sel_id, sel_ood) for x in lambdas]
    best = max(range(len(lambdas)), key=lambda i: mean_auroc(on_val[i]))
    oracle = max(range(len(lambdas)), key=lambda i: mean_auroc(per_lambda[i]))
    ablation = []
    for v in ALL_VARIANTS:
        if (v.m3 and stats is None) or not available(v):
            continue
        sweep = [{"lambda": x, "metrics": metrics(v, x)} for x in (lambdas if v.p_align else [0.0])]
        ablation.append(
            {
                "name": v.name,
                "m1": v.m1,
                "m2": v.m2,
                "m3": v.m3,
                "p_align": v.p_align,
                "metrics": metrics(v, lam if v.p_align else 0.0),
                "per_lambda": sweep,
            }
        )
    variants = {
        "neglabel": metrics(Variant(), 0.0),
        "neglabel_star": metrics(star, 0.0),
        "negalign": metrics(variant, lam),
        "negalign_selected": per_lambda[best],
    }
    configured = {
        "s_neglabel_plain": terms["star"],
        "s_neglabel_star": variant_scores(terms, star, 0.0, stats),
        "p_align": zscored(terms, "p_align", stats) if variant.m3 else terms["p_align"],
        "s_final": variant_scores(terms, variant, lam, stats),
    }
    return OODEvaluation(variants, per_lambda, best, oracle, ablation, configured, star, stats)
