"""Scoring a CIR benchmark from embeddings: rankings, the official metrics per dataset, and the
test-submission files (plain tensors; the modules call these at epoch end).

Unreadable images never change the denominator: a query whose reference could not be read has no
ranking and counts as a miss for every metric; an unreadable gallery image is absent from every
ranking, so a query whose target is unreadable is a miss too (CIRCO: that ground truth is never
found). `coverage` says how many queries were evaluated and which could not be.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xclip.cir.benchmark import CIRBenchmark
from xclip.io import atomic_write_text
from xclip.metrics.cir import (
    cir_recall,
    circo_map_at_k,
    cirr_recall,
    cirr_subset_recall,
    rank_gallery,
)

DEFAULT_KS = {"shapes": (1, 5, 10, 50), "cirr": (1, 5, 10, 50), "circo": (5, 10, 25, 50), "fashioniq": (10, 50)}
SUBSET_KS = (1, 2, 3)
SUBMISSION_TOP = 50


def rank_queries(
    bench: CIRBenchmark,
    query_index: Tensor,
    query_emb: Tensor,
    gallery_index: Tensor,
    gallery_emb: Tensor,
    top: int | None = None,
) -> Tensor:
    """Gallery indices ranked for each query, best first: [Q', top or G'].

    Only the gallery images that were embedded (`gallery_index`) are ranked; with categories
    (FashionIQ) each query is ranked within its own category's images (shorter rows are padded
    with -1).
    """
    gallery_index = gallery_index.long()
    if not any(bench.gallery_categories):
        pos = rank_gallery(query_emb, gallery_emb, top)
        return gallery_index[pos]
    gal_cat = [bench.gallery_categories[int(i)] for i in gallery_index]
    q_cat = [bench.queries[int(i)].category for i in query_index]
    width = top if top is not None else max(gal_cat.count(c) for c in set(gal_cat))
    out = torch.full((len(q_cat), width), -1, dtype=torch.long)
    for cat in sorted(set(q_cat)):  # one ranking per category (three for FashionIQ)
        g = torch.tensor([c == cat for c in gal_cat])
        q = torch.tensor([c == cat for c in q_cat])
        pos = rank_gallery(query_emb[q], gallery_emb[g], top)
        out[q, : pos.shape[1]] = gallery_index[g][pos]
    return out


def full_rankings(n_queries: int, query_index: Tensor, ranked: Tensor) -> Tensor:
    """Rankings of the evaluated queries [Q', W] placed in a [n_queries, W] table; the rows of
    queries that were not evaluated (unreadable reference) hold -1 (no ranking: a miss)."""
    full = torch.full((n_queries, ranked.shape[1]), -1, dtype=torch.long)
    full[query_index.long()] = ranked.long()
    return full


def _read_mask(bench: CIRBenchmark, gallery_index: Tensor | None) -> Tensor:
    """[N] bool: which gallery images were embedded (all when `gallery_index` is None)."""
    if gallery_index is None:
        return torch.ones(bench.n_gallery, dtype=torch.bool)
    mask = torch.zeros(bench.n_gallery, dtype=torch.bool)
    mask[gallery_index.long()] = True
    return mask


def _if_read(index: Tensor, read: Tensor) -> Tensor:
    """Gallery indices with those of images that were not read (and -1 padding) as -1."""
    return torch.where((index >= 0) & read[index.clamp(min=0)], index, torch.full_like(index, -1))


def benchmark_metrics(
    bench: CIRBenchmark,
    query_index: Tensor,
    ranked: Tensor,
    ks: tuple[int, ...] | None = None,
    gallery_index: Tensor | None = None,
) -> dict[str, float]:
    """The dataset's official metrics (fractions) over EVERY query of the benchmark.

    `ranked` [Q', W] holds the rankings of the evaluated queries `query_index` [Q'] over the
    gallery images that were read (`gallery_index`, default all). A query that was not evaluated
    (its reference could not be read) and a query whose target was not read count as misses.
    shapes: see `shapes_metrics`; CIRR: ``R@k`` with the reference removed and ``R_subset@k``; CIRCO:
    ``mAP@k`` and ``R@k`` of the first ground truth; FashionIQ: ``{category}_R@k`` and their
    average ``R@k``.
    """
    ks = tuple(ks or DEFAULT_KS[bench.name])
    if bool((bench.target_index() < 0).any()):
        raise ValueError(
            f"{bench.name} {bench.split}: some queries have no target (a test split): "
            "write a submission instead of scoring it"
        )
    ranked = full_rankings(len(bench), query_index, ranked)
    read = _read_mask(bench, gallery_index)
    evaluated = torch.zeros(len(bench), dtype=torch.bool)
    evaluated[query_index.long()] = True
    target = torch.where(evaluated, _if_read(bench.target_index(), read), -1)
    if bench.name == "shapes":
        return shapes_metrics(bench, ranked, target, read, ks)
    if bench.name == "cirr":
        reference = bench.reference_index()
        out = cirr_recall(ranked, target, reference, ks)
        out.update(cirr_subset_recall(ranked, target, reference, _if_read(bench.members_index(), read), SUBSET_KS))
        return out
    if bench.name == "circo":
        gts = bench.ground_truth_index()  # unread ones are absent from every ranking: never found
        out = circo_map_at_k(ranked, gts, ks)
        out.update(cir_recall(ranked, target, ks))
        return out
    out, per_cat = {}, []
    cats = [q.category for q in bench.queries]
    for cat in sorted(set(cats)):
        rows = torch.tensor([c == cat for c in cats])
        rec = cir_recall(ranked[rows], target[rows], ks)
        out.update({f"{cat}_{k}": v for k, v in rec.items()})
        per_cat.append(rec)
    out.update({k: sum(r[k] for r in per_cat) / len(per_cat) for k in per_cat[0]})
    return out


def coverage(
    bench: CIRBenchmark, query_index: Tensor, gallery_index: Tensor, unreadable_queries: Sequence[int] = ()
) -> dict[str, Any]:
    """What was scored: ``n_queries``, ``n_evaluated`` (queries ranked), ``n_gallery``,
    ``n_gallery_read`` and the ids of the queries that count as misses without a chance:
    ``not_evaluated`` (``unreadable_reference``: the queries `unreadable_queries`; ``not_loaded``:
    the others, e.g. under ``limit_val_batches``) and ``target_not_read`` (the target, or for
    CIRCO any ground truth, is an unreadable or unloaded gallery image)."""
    read = _read_mask(bench, gallery_index)
    evaluated, unreadable = set(query_index.long().tolist()), set(unreadable_queries)
    ids = [q.query_id or str(i) for i, q in enumerate(bench.queries)]
    missing = [i for i in range(len(bench)) if i not in evaluated]
    targets = [[t] if t >= 0 else [] for t in bench.target_index().tolist()]
    if bench.has_targets():  # CIRCO and ShapesWorld's CIRCO-style queries: every ground truth
        targets = [gts or ts for gts, ts in zip(bench.ground_truth_index(), targets)]
    return {
        "n_queries": len(bench),
        "n_evaluated": len(evaluated),
        "n_gallery": bench.n_gallery,
        "n_gallery_read": int(read.sum()),
        "not_evaluated": {
            "unreadable_reference": [ids[i] for i in missing if i in unreadable],
            "not_loaded": [ids[i] for i in missing if i not in unreadable],
        },
        "target_not_read": [ids[i] for i, ts in enumerate(targets) if any(not bool(read[t]) for t in ts)],
    }


def coverage_note(cov: Mapping[str, Any]) -> str:
    """The console's summary of `coverage`: '' when every query and image was used."""
    if not cov or (cov["n_evaluated"] == cov["n_queries"] and cov["n_gallery_read"] == cov["n_gallery"]):
        return ""
    not_eval = cov["not_evaluated"]
    parts = [f"{len(not_eval['unreadable_reference'])} with an unreadable reference"]
    if not_eval["not_loaded"]:
        parts.append(f"{len(not_eval['not_loaded'])} not loaded")
    parts.append(f"{len(cov['target_not_read'])} whose target (or a ground truth) was not read")
    return (
        f"{cov['n_evaluated']} of {cov['n_queries']} queries evaluated, {cov['n_gallery_read']} of "
        f"{cov['n_gallery']} images read; counted as misses: {', '.join(parts)}"
    )


def shapes_metrics(
    bench: CIRBenchmark, ranked: Tensor, target: Tensor, read: Tensor, ks: tuple[int, ...] | None = None
) -> dict[str, float]:
    """ShapesWorld CIR over every query: for the single-edit queries CIRR's ``R@k`` (whole gallery,
    reference removed) and ``R_subset@1,2,3`` (the reference's variant set); for the CIRCO-style
    ones (``ground_truth`` set) CIRCO's ``mAP@5,10,25,50``.

    `ranked` [n_queries, W] (rows of queries that were not evaluated hold -1), `target` [n_queries]
    (-1: a miss), `read` [n_gallery] bool: the gallery images that were embedded.
    """
    loose = torch.tensor([bool(q.ground_truth) for q in bench.queries], dtype=torch.bool)
    out: dict[str, float] = {}
    if bool((~loose).any()):
        reference = bench.reference_index()[~loose]
        members = _if_read(bench.members_index(), read)[~loose]
        out.update(cirr_recall(ranked[~loose], target[~loose], reference, tuple(ks or DEFAULT_KS["shapes"])))
        out.update(cirr_subset_recall(ranked[~loose], target[~loose], reference, members, SUBSET_KS))
    if bool(loose.any()):
        gts = bench.ground_truth_index()
        out.update(
            circo_map_at_k(
                ranked[loose], [gts[i] for i in torch.nonzero(loose).flatten().tolist()], DEFAULT_KS["circo"]
            )
        )
    return out


def per_category_recall(
    bench: CIRBenchmark, query_index: Tensor, ranked: Tensor, k: int = 1, subset: bool = False
) -> dict[str, float]:
    """Recall@k (reference removed; ``subset``: within the query's ``members``) per query category:
    ShapesWorld's edit kinds (queries with a ground-truth set are left out)."""
    qi = query_index.long()
    target, reference = bench.target_index()[qi], bench.reference_index()[qi]
    cats = [bench.queries[int(i)].category for i in qi]
    loose = [bool(bench.queries[int(i)].ground_truth) for i in qi]
    out = {}
    for cat in sorted({c for c, lo in zip(cats, loose) if not lo}):
        rows = torch.tensor([c == cat and not lo for c, lo in zip(cats, loose)])
        if subset:
            members = bench.members_index()[qi][rows]
            out[cat] = cirr_subset_recall(ranked[rows], target[rows], reference[rows], members, (k,))[f"R_subset@{k}"]
        else:
            out[cat] = cirr_recall(ranked[rows], target[rows], reference[rows], (k,))[f"R@{k}"]
    return out


def _without_reference(ranked: Tensor, reference: Tensor) -> list[list[int]]:
    return [[int(g) for g in row if int(g) != int(ref) and int(g) >= 0] for row, ref in zip(ranked, reference)]


def write_submissions(
    bench: CIRBenchmark, query_index: Tensor, ranked: Tensor, out_dir: str | Path, name: str
) -> list[Path]:
    """Test-submission files in the evaluation servers' formats.

    CIRR: ``{name}.json`` = ``{"version": "rc2", "metric": "recall", pairid: [top-50 names]}`` (reference
    removed) and ``subset_{name}.json`` with the top 3 among ``img_set.members`` and ``"metric":
    "recall_subset"``; CIRCO: ``{name}.json`` = ``{query id: [top-50 image ids]}``.
    """
    out_dir = Path(out_dir)
    keys, qi = bench.gallery_keys, query_index.long()
    if bench.name == "cirr":
        rows = _without_reference(ranked, bench.reference_index()[qi])
        members = bench.members_index()[qi]
        full: dict[str, Any] = {"version": "rc2", "metric": "recall"}
        subset: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
        for q, row, mem in zip(qi.tolist(), rows, members):
            pair = bench.queries[q].query_id
            allowed = {int(m) for m in mem if int(m) >= 0}
            full[pair] = [keys[g] for g in row[:SUBMISSION_TOP]]
            subset[pair] = [keys[g] for g in row if g in allowed][:3]
        paths = [out_dir / f"{name}.json", out_dir / f"subset_{name}.json"]
        atomic_write_text(paths[0], json.dumps(full, sort_keys=True))
        atomic_write_text(paths[1], json.dumps(subset, sort_keys=True))
        return paths
    if bench.name == "circo":
        sub = {
            bench.queries[q].query_id: [keys[int(g)] for g in row[:SUBMISSION_TOP] if int(g) >= 0]
            for q, row in zip(qi.tolist(), ranked)
        }
        path = out_dir / f"{name}.json"
        atomic_write_text(path, json.dumps(sub, sort_keys=True))
        return [path]
    raise ValueError(f"{bench.name} has no test server submission format: score its validation split instead")
