"""Composed image retrieval metrics as the official evaluations compute them (SEARLE's
``validate.py``), on rankings: ``ranked [Q, N]`` holds gallery indices, best first.

- CIRR: Recall@K over the whole gallery *after removing the reference image* from each ranking;
  Recall_subset@K among the query's ``img_set.members`` (after the same removal).
- CIRCO: no removal; AP@K = sum over the relevant ranks i <= K of precision@i, divided by
  min(#ground truths, K); mAP@K averages over queries. Its Recall@K uses the first ground truth.
- FashionIQ: plain Recall@K of the single target (per category, then averaged).

Every function returns fractions (the official scripts print percentages). A ranking may be cut
(e.g. the top 50 of a 120k gallery) as long as it holds at least max(ks) entries; a target missing
from a cut ranking counts as a miss. Index -1 is "nothing": -1 entries in a ranking are padding
(a query with no ranking, e.g. its reference image could not be read, is a row of -1), and a
target (or ground truth) of -1 is not in the ranked gallery (its image could not be read): both
count as misses, so the denominator is always every query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24  # score elements ranked at once (64 MiB of float32)


def _check_ranked(ranked: Tensor, ks: Sequence[int], name: str, removed: int = 0) -> None:
    if ranked.ndim != 2 or ranked.dtype.is_floating_point:
        raise ValueError(
            f"{name}: ranked must be an integer tensor [Q, N] of gallery indices, "
            f"got {ranked.dtype} {tuple(ranked.shape)}"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"{name}: ks must be positive, got {tuple(ks)}")
    if ranked.shape[1] - removed < max(ks):
        raise ValueError(
            f"{name}: a ranking of {ranked.shape[1]} entries cannot give Recall@{max(ks)}"
            f"{' after removing the reference' if removed else ''}: rank at least "
            f"{max(ks) + removed} gallery items"
        )


def _check_queries(ranked: Tensor, name: str, **per_query: Tensor) -> None:
    for field, t in per_query.items():
        if t.shape[0] != ranked.shape[0]:
            raise ValueError(f"{name}: {field} has {t.shape[0]} rows for {ranked.shape[0]} rankings")


def _positions(ranked: Tensor, items: Tensor) -> Tensor:
    """Position of ``items[q]`` in row q of `ranked` (N when absent or -1): [Q]."""
    items = items.to(ranked.device)
    hit = (ranked == items[:, None]) & (items[:, None] >= 0)
    n = ranked.shape[1]
    return torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(items, n, device=ranked.device))


def cir_recall(ranked: Tensor, target: Tensor, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """Recall@K of one target per query, no removal (FashionIQ; CIRCO's first ground truth).

    ranked [Q, N] long, target [Q] long -> ``{"R@k": fraction}``.
    """
    _check_ranked(ranked, ks, "cir_recall")
    _check_queries(ranked, "cir_recall", target=target)
    pos = _positions(ranked, target.long())
    return {f"R@{k}": float((pos < k).double().mean()) for k in ks}


def _rank_without_reference(ranked: Tensor, target: Tensor, reference: Tensor) -> Tensor:
    """The target's position once the reference is taken out of each ranking: [Q]."""
    pos_t = _positions(ranked, target.long())
    pos_r = _positions(ranked, reference.long())
    return pos_t - (pos_r < pos_t).long()


def cirr_recall(
    ranked: Tensor, target: Tensor, reference: Tensor, ks: Sequence[int] = (1, 5, 10, 50)
) -> dict[str, float]:
    """CIRR Recall@K: the reference image is removed from each ranking first.

    ranked [Q, N] long (gallery indices, best first), target [Q], reference [Q] -> ``{"R@k": fraction}``.
    """
    _check_ranked(ranked, ks, "cirr_recall", removed=1)
    _check_queries(ranked, "cirr_recall", target=target, reference=reference)
    if bool(((target.long() == reference.long()) & (target >= 0)).any()):
        raise ValueError("cirr_recall: a query's target is its own reference (CIRR removes the reference)")
    rank = _rank_without_reference(ranked, target, reference)
    return {f"R@{k}": float((rank < k).double().mean()) for k in ks}


def cirr_subset_recall(
    ranked: Tensor, target: Tensor, reference: Tensor, members: Tensor, ks: Sequence[int] = (1, 2, 3)
) -> dict[str, float]:
    """CIRR Recall_subset@K: the ranking restricted to the query's ``img_set.members`` after
    removing the reference.

    ranked [Q, N] long, target [Q], reference [Q], members [Q, M] long (gallery indices; pad with
    -1; CIRR's sets hold 6 images including the reference) -> ``{"R_subset@k": fraction}``.
    Rankings must hold every member (rank the whole gallery); a target of -1 is a miss.
    """
    _check_ranked(ranked, ks, "cirr_subset_recall")
    _check_queries(ranked, "cirr_subset_recall", target=target, reference=reference, members=members)
    members = members.long().to(ranked.device)
    target, reference = target.long().to(ranked.device), reference.long().to(ranked.device)
    known = target >= 0
    outside = known & ~(members == target[:, None]).any(1)
    if bool(outside.any()):
        bad = outside.nonzero().flatten().tolist()
        raise ValueError(f"cirr_subset_recall: the target is not among img_set.members of queries {bad[:10]}")
    in_set = (ranked[:, :, None] == members[:, None, :]).any(-1) & (ranked != reference[:, None]) & (ranked >= 0)
    pos_t = _positions(ranked, target)
    if bool((known & (pos_t == ranked.shape[1])).any()):
        raise ValueError("cirr_subset_recall: a target is missing from its ranking: rank the whole gallery")
    before = in_set & (torch.arange(ranked.shape[1], device=ranked.device)[None, :] < pos_t[:, None])
    rank = torch.where(known, before.sum(1), torch.full_like(pos_t, ranked.shape[1]))
    return {f"R_subset@{k}": float((rank < k).double().mean()) for k in ks}


def circo_map_at_k(
    ranked: Tensor, ground_truth: Sequence[Sequence[int]], ks: Sequence[int] = (5, 10, 25, 50)
) -> dict[str, float]:
    """CIRCO mAP@K with several ground truths per query (no reference removal).

    ``AP@K = sum_{i <= K, label_i = 1} precision@i / min(#ground truths, K)``, averaged over queries.
    ranked [Q, N] long; ground_truth: Q lists of distinct gallery indices (non-empty; -1: an image
    not in the ranked gallery, never found but counted in #ground truths) -> ``{"mAP@k": fraction}``.
    """
    _check_ranked(ranked, ks, "circo_map_at_k")
    if len(ground_truth) != ranked.shape[0]:
        raise ValueError(f"circo_map_at_k: {len(ground_truth)} ground-truth lists for {ranked.shape[0]} rankings")
    empty = [q for q, g in enumerate(ground_truth) if len(g) == 0]
    if empty:
        raise ValueError(f"circo_map_at_k: queries {empty[:10]} have no ground truth")
    for q, g in enumerate(ground_truth):  # a repeat would be counted as several hits and ground truths
        seen = [int(i) for i in g]
        if len(set(seen)) != len(seen):
            repeated = next(i for i in seen if seen.count(i) > 1)
            raise ValueError(
                f"circo_map_at_k: query {q}'s ground truth repeats gallery index {repeated} "
                f"({seen}): list each ground truth once"
            )
    width = max(len(g) for g in ground_truth)
    gt = torch.full((len(ground_truth), width), -1, dtype=torch.long)
    for q, g in enumerate(ground_truth):  # building the padded table; the scoring below is batched
        gt[q, : len(g)] = torch.as_tensor([int(i) for i in g])
    gt = gt.to(ranked.device)
    n_gt = torch.tensor([len(g) for g in ground_truth], dtype=torch.float64, device=ranked.device)
    top = ranked[:, : max(ks)]
    labels = ((top[:, :, None] == gt[:, None, :]) & (gt[:, None, :] >= 0)).any(-1).double()  # [Q, Kmax]
    ranks = torch.arange(1, top.shape[1] + 1, device=ranked.device, dtype=torch.float64)
    precision = labels.cumsum(1) / ranks * labels
    return {f"mAP@{k}": float((precision[:, :k].sum(1) / n_gt.clamp(max=k)).mean()) for k in ks}


def rank_gallery(
    queries: Tensor, gallery: Tensor, top: int | None = None, chunk_elements: int = _CHUNK_ELEMENTS
) -> Tensor:
    """Gallery indices by descending cosine, best first: queries [Q, D], gallery [N, D] -> [Q, top or N].

    Both sides are L2-normalised here; ties keep the lower gallery index first (stable), so
    rankings are deterministic. Queries are scored in chunks (bounded memory). NaN or infinite
    embeddings are refused (a NaN cosine sorts first: that row would top every ranking).
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"rank_gallery: queries [Q, D] and gallery [N, D] must share D, got "
            f"{tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    for side, emb in (("query", queries), ("gallery", gallery)):
        bad = (~torch.isfinite(emb)).any(1).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"rank_gallery: {side} rows {bad[:10].tolist()}{' ...' if bad.numel() > 10 else ''} "
                f"hold NaN or infinite values ({bad.numel()} of {emb.shape[0]}): the model produced "
                "non-finite embeddings for them (check its weights, the precision, the input images)"
            )
    n = gallery.shape[0]
    top = n if top is None else min(int(top), n)
    q, g = F.normalize(queries.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    rows = max(1, chunk_elements // max(n, 1))
    out = []
    for start in range(0, q.shape[0], rows):
        scores = q[start : start + rows] @ g.T
        out.append(torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top])
    return torch.cat(out) if out else torch.zeros(0, top, dtype=torch.long)
