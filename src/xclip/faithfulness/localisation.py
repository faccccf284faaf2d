"""Per-image localisation and pair statistics of TiPAI maps against known errors (plain tensors).

A goodness map [N, G, G] becomes a badness map (`scoring.badness`), painted over the image's
pixels cell by cell (the grid's own edges, no smoothing) and compared with the error's pixel
mask by the saliency-benchmark metrics; "worst cell on error" asks whether the map's lowest cell
touches the error (the mask mean-pooled per cell is > 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from xclip.explain.random_map import random_values
from xclip.faithfulness.grid import cell_means, cells_to_pixels
from xclip.faithfulness.scoring import badness, worst_cell
from xclip.metrics.saliency import SALIENCY_METRICS

METRIC_KEYS = {"KLD": "kld", "CC": "cc", "SIM": "sim", "NSS": "nss", "AUC-Judd": "auc_judd"}


def error_cells(masks: Tensor, grid: int) -> Tensor:
    """[N, H, W] error masks -> [N, G, G] bool: the cells the error touches."""
    return cell_means(masks.float(), grid) > 0


def localisation(goodness: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Compare goodness maps [N, G, G] with error masks [N, H, W].

    Returns [N] tensors: ``kld``, ``cc``, ``sim``, ``nss``, ``auc_judd`` (float64; NaN for an image
    without error) and ``hit`` (int64: 1 when the worst cell touches the error, 0 when not, -1
    without error).
    """
    g = goodness.shape[-1]
    has_error = masks.flatten(1).any(1)
    painted = cells_to_pixels(badness(goodness.double()), (masks.shape[-2], masks.shape[-1]))
    out = {METRIC_KEYS[name]: fn(painted, masks.double()) for name, fn in SALIENCY_METRICS.items()}
    cells = error_cells(masks, g).flatten(1)
    hit = cells.gather(1, worst_cell(goodness)[:, None].to(cells.device))[:, 0].long()
    out["hit"] = torch.where(has_error, hit, torch.full_like(hit, -1))
    return out


def random_goodness(index: Tensor, seed: Tensor, grid: int, base_seed: int = 0) -> Tensor:
    """Uniform random maps [N, G, G], one per (prompt index, image seed) and the same in any batch
    or process (the random-map baseline)."""
    maps = [
        random_values((grid, grid), hash((base_seed, i, s)) & 0x7FFFFFFF)  # ints hash the same in every process
        for i, s in zip(index.tolist(), seed.tolist())
    ]
    return torch.stack(maps) if maps else torch.zeros(0, grid, grid)


def _first_extreme(score: Tensor, inverse: Tensor, n_groups: int, reduce: str) -> Tensor:
    """[n_groups] position of each group's best ("amax") or worst ("amin") score; on a tie the first
    image by position is the chosen (rejected) one."""
    n = score.shape[0]
    fill = -torch.inf if reduce == "amax" else torch.inf
    extreme = torch.full((n_groups,), fill, dtype=score.dtype).scatter_reduce(0, inverse, score, reduce)
    pos = torch.arange(n)
    return torch.full((n_groups,), n).scatter_reduce(0, inverse, torch.where(score == extreme[inverse], pos, n), "amin")


def rejected_images(score: Tensor, prompt: Tensor) -> Tensor:
    """[N] bool: each prompt's rejected image, the worst by `score` [N] (first on a tie)."""
    ids, inverse = torch.unique(prompt, return_inverse=True)
    rejected = torch.zeros(score.shape[0], dtype=torch.bool)
    rejected[_first_extreme(score.double(), inverse, len(ids), "amin")] = True
    return rejected


def pair_statistics(score: Tensor, prompt: Tensor, faithful: Tensor) -> dict[str, float]:
    """Ground-truth pair statistics of a global score over images of several prompts.

    Args:
        score: [N] global scores; prompt: [N] prompt ids (ints); faithful: [N] 1 / 0 (-1 unknown:
            such images are ignored).
    Returns:
        ``pair_accuracy``: share of (faithful, erroneous) pairs of a prompt where the faithful one
        scores strictly higher; ``chosen_is_faithful``: share of prompts (with a known faithful and
        an erroneous image) whose best-scored image is faithful; ``rejected_is_erroneous``: same
        for the worst-scored one; ``n_pairs``, ``n_prompts``.
    """
    known = faithful >= 0
    score, prompt, faithful = score[known].double(), prompt[known], faithful[known].bool()
    same = prompt[:, None] == prompt[None, :]
    pairs = same & faithful[:, None] & ~faithful[None, :]
    n_pairs = int(pairs.sum())
    acc = float((score[:, None] > score[None, :])[pairs].double().mean()) if n_pairs else float("nan")
    ids, inverse = torch.unique(prompt, return_inverse=True)
    mixed = torch.zeros(len(ids), dtype=torch.bool)
    mixed[inverse[faithful]] = True
    has_error = torch.zeros(len(ids), dtype=torch.bool)
    has_error[inverse[~faithful]] = True
    mixed &= has_error
    first_best = _first_extreme(score, inverse, len(ids), "amax")
    first_worst = _first_extreme(score, inverse, len(ids), "amin")
    m = int(mixed.sum())
    return {
        "pair_accuracy": acc,
        "chosen_is_faithful": float(faithful[first_best[mixed]].double().mean()) if m else float("nan"),
        "rejected_is_erroneous": float((~faithful[first_worst[mixed]]).double().mean()) if m else float("nan"),
        "n_pairs": n_pairs,
        "n_prompts": m,
    }
