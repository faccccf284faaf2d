"""The console report of TiPAI runs (`ReportRow`s from the logged metrics)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from xclip.faithfulness.localisation import METRIC_KEYS
from xclip.results import ReportRow

# what a run counts (results.json, the console report): prompts seen, without a readable image, written
# (scored now) or read back whole; images scored for the first time, re-scored because their file or
# prompt changed, read back from the database; pairs
COUNTS = (
    "prompts",
    "prompts_without_images",
    "prompts_scored",
    "prompts_from_database",
    "images_scored",
    "images_rescored",
    "images_from_database",
    "pairs",
)


def tipai_report_rows(
    metrics: Mapping[str, float | None], pre: str, stage: str, baselines: Sequence[str], grid: int
) -> list[ReportRow]:
    """Rows of one stage's metrics, whose keys start with `pre` (``{stage}/faithfulness/tipai/``):
    the counts, the pair statistics, each map's localisation (incl. the random map), chance and
    agreement."""
    rows = []
    if pre + "n_prompts" in metrics:
        n = {k: int(metrics.get(f"{pre}n_{k}") or 0) for k in (*COUNTS, "images", "images_skipped")}
        rows.append(
            ReportRow(
                "text-to-image faithfulness",
                f"prompts [{stage}]: {n['prompts']} ({n['prompts_scored']} written (new or changed), "
                f"{n['prompts_from_database']} unchanged in the database, {n['prompts_without_images']} without a "
                "readable image)",
                {},
                [pre + f"n_{k}" for k in COUNTS if k.startswith("prompts")],
            )
        )
        rows.append(
            ReportRow(
                "text-to-image faithfulness",
                f"images [{stage}]: {n['images']} ({n['images_scored']} new, {n['images_rescored']} changed and "
                f"re-scored, {n['images_from_database']} read back from the database); {n['images_skipped']} "
                "unreadable and skipped",
                {},
                [pre + f"n_{k}" for k in (*COUNTS, "images", "images_skipped") if k.startswith("images")],
            )
        )
        keys = [
            pre + k
            for k in ("pairs/mean_chosen_score", "pairs/mean_rejected_score", "pairs/mean_score_gap")
            if pre + k in metrics
        ]
        names = {"mean_chosen_score": "chosen", "mean_rejected_score": "rejected", "mean_score_gap": "gap"}
        rows.append(
            ReportRow(
                "text-to-image faithfulness",
                f"{n['pairs']} chosen/rejected pairs: mean global score [{stage}]",
                {names[k.rsplit("/", 1)[1]]: metrics[k] for k in keys},
                [pre + "n_pairs", *keys],
            )
        )
    keys = [pre + k for k in ("pair_accuracy", "chosen_is_faithful", "rejected_is_erroneous") if pre + k in metrics]
    if keys:
        rows.append(
            ReportRow(
                "text-to-image faithfulness",
                f"global CLIP score: pairs [{stage}]",
                {k.rsplit("/", 1)[1].replace("_", " "): metrics[k] for k in keys},
                keys,
            )
        )
    for name in baselines:
        keys = [
            f"{pre}{name}/{m}"
            for m in (*METRIC_KEYS, "worst_cell_on_error", "rejected_worst_cell_on_error")
            if f"{pre}{name}/{m}" in metrics
        ]
        if keys:
            label = {"random": "random map"}.get(name, name)
            names = {
                "worst_cell_on_error": "worst cell on error",
                "rejected_worst_cell_on_error": "rejected: worst cell on error",
            }
            rows.append(
                ReportRow(
                    "text-to-image faithfulness",
                    f"{label} {grid}x{grid}: badness vs error mask [{stage}]",
                    {names.get(k.rsplit("/", 1)[1], k.rsplit("/", 1)[1]): metrics[k] for k in keys},
                    keys,
                )
            )
    labels = {
        "random_pick/worst_cell_on_error": "random cell on error",
        "random_pick/rejected_worst_cell_on_error": "random cell on a rejected image's error",
        "agreement/crops_and_dense_worst_cell_on_error": "crops and dense both on error",
        "agreement/chance": "both by chance",
    }
    keys = [pre + k for k in labels if pre + k in metrics]
    if keys:
        rows.append(
            ReportRow(
                "text-to-image faithfulness",
                f"worst cell: chance and agreement [{stage}]",
                {labels[k[len(pre) :]]: metrics[k] for k in keys},
                keys,
            )
        )
    return rows
