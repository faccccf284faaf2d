"""CIR metrics against brute-force re-implementations of SEARLE's validate.py logic (lists, loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xclip.metrics import (
    cir_recall,
    circo_map_at_k,
    cirr_recall,
    cirr_subset_recall,
    rank_gallery,
)


def _random_rankings(q: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(q)])


def brute_cirr(ranked, target, reference, ks):
    """SEARLE: drop the reference from the sorted names, then label = name == target."""
    out = {}
    for k in ks:
        hits = 0
        for row, t, r in zip(ranked.tolist(), target.tolist(), reference.tolist()):
            kept = [g for g in row if g != r]
            hits += t in kept[:k]
        out[f"R@{k}"] = hits / len(ranked)
    return out


def brute_subset(ranked, target, reference, members, ks):
    out = {}
    for k in ks:
        hits = 0
        for row, t, r, mem in zip(ranked.tolist(), target.tolist(), reference.tolist(), members.tolist()):
            kept = [g for g in row if g != r and g in mem]
            hits += t in kept[:k]
        out[f"R_subset@{k}"] = hits / len(ranked)
    return out


def brute_ap(row, gts, k):
    hits, total = 0, 0.0
    for i, g in enumerate(row[:k], start=1):
        if g in gts:
            hits += 1
            total += hits / i
    return total / min(len(gts), k)


def test_cirr_recall_removes_the_reference_like_the_official_code():
    n, q = 40, 60
    ranked = _random_rankings(q, n, 0)
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, n, (q,), generator=g)
    reference = (target + torch.randint(1, n, (q,), generator=g)) % n
    # make the reference rank right before the target often, where removal matters
    for i in range(0, q, 3):
        row = ranked[i].tolist()
        row.remove(int(reference[i]))
        row.insert(row.index(int(target[i])), int(reference[i]))
        ranked[i] = torch.tensor(row)
    ks = (1, 2, 5, 10, 39)
    assert cirr_recall(ranked, target, reference, ks) == pytest.approx(brute_cirr(ranked, target, reference, ks))


def test_cirr_recall_hand_case():
    ranked = torch.tensor([[3, 0, 1, 2], [0, 1, 2, 3]])
    # query 0: reference 3 ranked first -> after removal the target 0 is first
    # query 1: reference 2 after target 1 -> target stays at rank 1 (second)
    out = cirr_recall(ranked, torch.tensor([0, 1]), torch.tensor([3, 2]), ks=(1, 2))
    assert out == {"R@1": 0.5, "R@2": 1.0}


def test_cirr_subset_recall_vs_brute_force():
    n, q, m = 30, 50, 6
    ranked = _random_rankings(q, n, 2)
    g = torch.Generator().manual_seed(3)
    members = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(q)])
    target, reference = members[:, 1].clone(), members[:, 0].clone()
    ks = (1, 2, 3)
    assert cirr_subset_recall(ranked, target, reference, members, ks) == pytest.approx(
        brute_subset(ranked, target, reference, members, ks)
    )


def test_cirr_subset_recall_rejects_a_target_outside_the_set():
    ranked = torch.arange(5)[None]
    with pytest.raises(ValueError, match="not among img_set.members of queries \\[0\\]"):
        cirr_subset_recall(ranked, torch.tensor([4]), torch.tensor([0]), torch.tensor([[0, 1, 2]]))


def test_circo_map_with_several_ground_truths_vs_brute_force():
    n, q = 80, 40
    ranked = _random_rankings(q, n, 4)
    rng = np.random.default_rng(5)
    gts = [list(rng.choice(n, size=int(rng.integers(1, 12)), replace=False)) for _ in range(q)]
    for i in range(0, q, 4):  # put ground truths near the top too
        row = [g for g in ranked[i].tolist() if g not in gts[i]]
        ranked[i] = torch.tensor(gts[i][:3] + row[:5] + gts[i][3:] + row[5:])
    ks = (5, 10, 25, 50)
    expected = {
        f"mAP@{k}": float(np.mean([brute_ap(r, set(gt), k) for r, gt in zip(ranked.tolist(), gts)])) for k in ks
    }
    assert circo_map_at_k(ranked, gts, ks) == pytest.approx(expected)


def test_circo_ap_hand_case():
    # ground truths 7 and 9 at ranks 1 and 3: AP@5 = (1/1 + 2/3) / min(2, 5)
    ranked = torch.tensor([[7, 1, 9, 2, 3, 4]])
    assert circo_map_at_k(ranked, [[7, 9]], ks=(1, 5))["mAP@5"] == pytest.approx((1 + 2 / 3) / 2)
    assert circo_map_at_k(ranked, [[7, 9]], ks=(1, 5))["mAP@1"] == pytest.approx(1.0)  # / min(2, 1)


def test_cir_recall_accepts_cut_rankings_and_counts_missing_targets_as_misses():
    ranked = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert cir_recall(ranked, torch.tensor([7, 9]), ks=(1, 3)) == {"R@1": 0.0, "R@3": 0.5}


def test_metric_inputs_are_checked():
    ranked = torch.arange(5)[None]
    with pytest.raises(ValueError, match="cannot give Recall@10"):
        cir_recall(ranked, torch.tensor([1]), ks=(10,))
    with pytest.raises(ValueError, match="after removing the reference"):
        cirr_recall(ranked, torch.tensor([1]), torch.tensor([2]), ks=(5,))
    with pytest.raises(ValueError, match="integer tensor"):
        cir_recall(ranked.float(), torch.tensor([1]), ks=(1,))
    with pytest.raises(ValueError, match="no ground truth"):
        circo_map_at_k(ranked, [[]], ks=(1,))
    with pytest.raises(ValueError, match="its own reference"):
        cirr_recall(ranked, torch.tensor([1]), torch.tensor([1]), ks=(1,))


def test_rank_gallery_is_a_stable_descending_sort_of_cosines():
    g = torch.Generator().manual_seed(6)
    gallery = torch.randn(50, 8, generator=g)
    gallery[10] = gallery[3] * 2  # same direction: a tie in cosine; the lower index ranks first
    queries = torch.randn(7, 8, generator=g)
    queries[0] = gallery[3]
    ranked = rank_gallery(queries, gallery, chunk_elements=100)  # several chunks
    cos = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(gallery, dim=-1).T
    for q in range(7):
        expected = sorted(range(50), key=lambda j: (-round(float(cos[q, j]), 6), j))
        assert ranked[q].tolist() == expected
    assert ranked[0, :2].tolist() == [3, 10]
    assert rank_gallery(queries, gallery, top=5).shape == (7, 5)


def test_rank_gallery_refuses_nan_embeddings():
    g = torch.Generator().manual_seed(7)
    gallery, queries = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    bad = gallery.clone()
    bad[4, 1] = float("nan")  # ranked first for every query before the check
    with pytest.raises(ValueError, match=r"rank_gallery: gallery rows \[4\] hold NaN or infinite values"):
        rank_gallery(queries, bad)
    bad = queries.clone()
    bad[2] = float("inf")
    with pytest.raises(ValueError, match=r"rank_gallery: query rows \[2\] hold NaN or infinite values"):
        rank_gallery(bad, gallery)


def test_circo_map_refuses_repeated_ground_truths():
    ranked = torch.tensor([[1, 0, 2, 3, 4, 5]])
    assert circo_map_at_k(ranked, [[1]], ks=(5,)) == {"mAP@5": 1.0}
    with pytest.raises(ValueError, match=r"circo_map_at_k: query 0's ground truth repeats gallery index 1"):
        circo_map_at_k(ranked, [[1, 1, 1]], ks=(5,))  # was 1/3


def test_a_query_without_ranking_or_without_target_counts_as_a_miss():
    # gallery 0..5 with image 4 unreadable (absent from every ranking); target -1 = not in the ranked
    # gallery. Query 0: ref 0, target 1, a hit at rank 1 once the reference is removed. Query 1: its
    # reference was unreadable (no ranking: a row of -1). Query 2: ref 2, its target 4 unreadable.
    ranked = torch.tensor([[0, 1, 2, 3, 5], [-1, -1, -1, -1, -1], [2, 3, 0, 1, 5]])
    target, reference = torch.tensor([1, -1, -1]), torch.tensor([0, 1, 2])
    members = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, -1]])
    assert cirr_recall(ranked, target, reference, ks=(1, 4)) == {"R@1": 1 / 3, "R@4": 1 / 3}
    assert cirr_subset_recall(ranked, target, reference, members, ks=(1, 2)) == {
        "R_subset@1": 1 / 3,
        "R_subset@2": 1 / 3,
    }
    assert cir_recall(ranked, target, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1 / 3}  # -1 padding is never a hit
    # AP@2: query 0 (1/2) / 1, query 1 nothing, query 2: 3 at rank 2 -> (1/2) / min(2, 2)
    assert circo_map_at_k(ranked, [[1], [-1], [4, 3]], ks=(1, 2)) == {"mAP@1": 0.0, "mAP@2": pytest.approx(0.75 / 3)}
