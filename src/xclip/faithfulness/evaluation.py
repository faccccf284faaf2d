"""TiPAI's measurements over a run (plain functions on the gathered per-image table): the chosen /
rejected pair statistics and, with ShapesWorld's known errors, each map's localisation of the
error (saliency metrics, worst cell on the error, over all erroneous images and over the rejected
ones), next to a random map, a random cell and the crops/dense agreement by chance."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from xclip.faithfulness.localisation import METRIC_KEYS, pair_statistics, rejected_images

METRIC_NAMES = {v: k for k, v in METRIC_KEYS.items()}


def tipai_metrics(
    rows: dict[str, Tensor], baselines: Sequence[str], map_names: Sequence[str], n_pairs: int, pair_sums: Tensor
) -> dict[str, float]:
    """The run's metrics (keys as logged under ``{stage}/faithfulness/tipai/``).

    Args:
        rows: the gathered table: ``index``, ``seed``, ``global``, ``faithful``, ``error_share``,
            ``<map>_<metric>`` and ``<map>_hit`` per image [N].
        baselines: the maps measured (the module's maps and ``random``).
        map_names: the module's own maps (``crops``, ``dense``, ``head``).
        n_pairs, pair_sums: the chosen/rejected pairs written and the sums of their chosen score,
            rejected score and gap [3].
    """
    metrics: dict[str, float] = {}
    if n_pairs:
        mean = (pair_sums / n_pairs).tolist()
        metrics.update(
            {"pairs/mean_chosen_score": mean[0], "pairs/mean_rejected_score": mean[1], "pairs/mean_score_gap": mean[2]}
        )
    if rows["index"].numel():
        stats = pair_statistics(rows["global"], rows["index"], rows["faithful"])
        if stats["n_pairs"]:
            metrics.update({k: stats[k] for k in ("pair_accuracy", "chosen_is_faithful", "rejected_is_erroneous")})
        error = rows["error_share"].isfinite() & (rows["faithful"] == 0)
        if error.any():
            for name in baselines:
                for key, label in METRIC_NAMES.items():
                    metrics[f"{name}/{label}"] = float(rows[f"{name}_{key}"][error].nanmean())
                metrics[f"{name}/worst_cell_on_error"] = float(rows[f"{name}_hit"][error].double().mean())
            share = rows["error_share"][error]
            metrics["random_pick/worst_cell_on_error"] = float(share.mean())
            # the images a user would look at: each prompt's rejected one, when it has an error
            rejected = error & rejected_images(rows["global"], rows["index"])
            if rejected.any():
                for name in baselines:
                    hits = rows[f"{name}_hit"][rejected].double()
                    metrics[f"{name}/rejected_worst_cell_on_error"] = float(hits.mean())
                metrics["random_pick/rejected_worst_cell_on_error"] = float(rows["error_share"][rejected].mean())
            if {"crops", "dense"} <= set(map_names):
                both = (rows["crops_hit"][error] == 1) & (rows["dense_hit"][error] == 1)
                metrics["agreement/crops_and_dense_worst_cell_on_error"] = float(both.double().mean())
                metrics["agreement/chance"] = float(share.square().mean())
    return metrics
