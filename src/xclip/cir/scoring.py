"""Scoring a CIR benchmark from embeddings: rankings, the official metrics per dataset, and the
test-submission files (plain tensors; the modules call these at epoch end)."""

from __future__ import annotations

import json
from pathlib import Path

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


def rank_queries(bench: CIRBenchmark, query_index: Tensor, query_emb: Tensor, gallery_index: Tensor,
                 gallery_emb: Tensor, top: int | None = None) -> Tensor:
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


def benchmark_metrics(bench: CIRBenchmark, query_index: Tensor, ranked: Tensor,
                      ks: tuple[int, ...] | None = None) -> dict[str, float]:
    """The dataset's official metrics (fractions) for the ranked queries.

    shapes: see `shapes_metrics`; CIRR: ``R@k`` with the reference removed and ``R_subset@k``; CIRCO:
    ``mAP@k`` and ``R@k`` of the first ground truth; FashionIQ: ``{category}_R@k`` and their
    average ``R@k``.
    """
    ks = tuple(ks or DEFAULT_KS[bench.name])
    qi = query_index.long()
    target = bench.target_index()[qi]
    if bool((target < 0).any()):
        raise ValueError(f"{bench.name} {bench.split}: some queries have no target (a test split): "
                         "write a submission instead of scoring it")
    if bench.name == "shapes":
        return shapes_metrics(bench, qi, ranked, ks)
    if bench.name == "cirr":
        reference = bench.reference_index()[qi]
        out = cirr_recall(ranked, target, reference, ks)
        out.update(cirr_subset_recall(ranked, target, reference, bench.members_index()[qi], SUBSET_KS))
        return out
    if bench.name == "circo":
        gts = bench.ground_truth_index()
        out = circo_map_at_k(ranked, [gts[int(i)] for i in qi], ks)
        out.update(cir_recall(ranked, torch.tensor([gts[int(i)][0] for i in qi]), ks))
        return out
    out, per_cat = {}, []
    cats = [bench.queries[int(i)].category for i in qi]
    for cat in sorted(set(cats)):
        rows = torch.tensor([c == cat for c in cats])
        rec = cir_recall(ranked[rows], target[rows], ks)
        out.update({f"{cat}_{k}": v for k, v in rec.items()})
        per_cat.append(rec)
    out.update({k: sum(r[k] for r in per_cat) / len(per_cat) for k in per_cat[0]})
    return out


def shapes_metrics(bench: CIRBenchmark, query_index: Tensor, ranked: Tensor,
                   ks: tuple[int, ...] | None = None) -> dict[str, float]:
    """ShapesWorld CIR: over the single-edit queries CIRR's ``R@k`` (whole gallery, reference
    removed) and ``R_subset@1,2,3`` (the reference's variant set); over the CIRCO-style ones
    (``ground_truth`` set) CIRCO's ``mAP@5,10,25,50``."""
    qi = query_index.long()
    loose = torch.tensor([bool(bench.queries[int(i)].ground_truth) for i in qi], dtype=torch.bool)
    out: dict[str, float] = {}
    if bool((~loose).any()):
        single, rows = qi[~loose], ranked[~loose]
        target, reference = bench.target_index()[single], bench.reference_index()[single]
        out.update(cirr_recall(rows, target, reference, tuple(ks or DEFAULT_KS["shapes"])))
        out.update(cirr_subset_recall(rows, target, reference, bench.members_index()[single], SUBSET_KS))
    if bool(loose.any()):
        gts = bench.ground_truth_index()
        out.update(circo_map_at_k(ranked[loose], [gts[int(i)] for i in qi[loose]], DEFAULT_KS["circo"]))
    return out


def per_category_recall(bench: CIRBenchmark, query_index: Tensor, ranked: Tensor, k: int = 1,
                        subset: bool = False) -> dict[str, float]:
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


def write_submissions(bench: CIRBenchmark, query_index: Tensor, ranked: Tensor, out_dir: str | Path,
                      name: str) -> list[Path]:
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
        full = {"version": "rc2", "metric": "recall"}
        subset = {"version": "rc2", "metric": "recall_subset"}
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
        sub = {bench.queries[q].query_id: [keys[int(g)] for g in row[:SUBMISSION_TOP] if int(g) >= 0]
               for q, row in zip(qi.tolist(), ranked)}
        path = out_dir / f"{name}.json"
        atomic_write_text(path, json.dumps(sub, sort_keys=True))
        return [path]
    raise ValueError(f"{bench.name} has no test server submission format: score its validation split instead")
