"""OOD metrics against scikit-learn, hand cases for both FPR95 conventions, and the Metric wrapper."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.utilities import dim_zero_cat

from xclip.metrics.ood import OODMetrics, fpr_at_tpr, ood_metrics


def sklearn_metrics(id_s, ood_s):
    """The NegLabel conventions written with scikit-learn's curves."""
    scores = np.r_[id_s, ood_s]
    is_id = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    # thresholds from the first (index 0 is sklearn's "accept nothing" point) up to the first
    # accepting every ID sample; nearest TPR to 0.95, ties to the lowest threshold
    last = int(np.argmax(tpr == 1))
    dist = np.abs(tpr[1 : last + 1] - 0.95)
    nearest = 1 + np.flatnonzero(dist == dist.min())[-1]
    return {
        "auroc": roc_auc_score(is_id, scores),
        "fpr95": fpr[nearest],
        "aupr_in": average_precision_score(is_id, scores),
        "aupr_out": average_precision_score(1 - is_id, -scores),
    }


def sklearn_openood_fpr95(id_s, ood_s):
    scores = np.r_[id_s, ood_s]
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tpr, _ = roc_curve(is_ood, -scores, drop_intermediate=False)
    return fpr[np.argmax(tpr >= 0.95)]


def random_scores(seed, n_id=300, n_ood=200, decimals=None):
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)
    if decimals is not None:  # heavy ties, also across the two sets
        id_s, ood_s = id_s.round(decimals), ood_s.round(decimals)
    return id_s, ood_s


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed, decimals):
    id_s, ood_s = random_scores(seed, decimals=decimals)
    ours, ref = ood_metrics(id_s, ood_s), sklearn_metrics(id_s, ood_s)
    assert ours["fpr95"] == ref["fpr95"]  # a ratio of counts: exact
    for key in ("auroc", "aupr_in", "aupr_out"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    assert ood_metrics(id_s, ood_s, "openood")["fpr95"] == sklearn_openood_fpr95(id_s, ood_s)


def test_tensor_and_numpy_inputs_agree():
    id_s, ood_s = random_scores(3, decimals=1)
    assert ood_metrics(torch.tensor(id_s, dtype=torch.float32), torch.tensor(ood_s)) == ood_metrics(
        id_s.astype(np.float32), ood_s
    )


def test_fpr95_hand_case_and_conventions_differ():
    # 20 ID scores 0.05, 0.10, ..., 1.00; 5 OOD scores.
    id_s = np.arange(1, 21) / 20
    ood_s = np.array([0.0, 0.07, 0.12, 0.5, 0.99])
    # NegLabel: ID recall 19/20 = 0.95 at thresholds 0.10 (3 OOD above: 0.12, 0.5, 0.99) and 0.07
    # (4 OOD); both are exactly 0.95, the reference takes the lower threshold -> 4/5.
    assert fpr_at_tpr(id_s, ood_s, 0.95, "nearest") == 0.8
    # "first_geq" with ID positive stops at 0.10 -> 3/5
    assert fpr_at_tpr(id_s, ood_s, 0.95, "first_geq") == 0.6
    # OpenOOD: OOD positive; 4/5 OOD caught (0.8) < 0.95, so every OOD must be caught: reject all
    # scores <= 0.99 -> 19 of the 20 ID rejected -> 19/20.
    assert ood_metrics(id_s, ood_s, "neglabel")["fpr95"] == 0.8
    assert ood_metrics(id_s, ood_s, "openood")["fpr95"] == 0.95
    assert sklearn_metrics(id_s, ood_s)["fpr95"] == 0.8 and sklearn_openood_fpr95(id_s, ood_s) == 0.95
    # AUROC does not depend on the convention; it is the share of (ID, OOD) pairs ranked right
    pairs = (id_s[:, None] > ood_s[None]).sum() + 0.5 * (id_s[:, None] == ood_s[None]).sum()
    assert ood_metrics(id_s, ood_s, "openood")["auroc"] == ood_metrics(id_s, ood_s)["auroc"] == pairs / 100


def test_fpr95_nearest_picks_closest_recall():
    # ID 1..20; at threshold 2 ID recall is 19/20; OOD 30, 18.5, 2.5 score above it, 0.5 below 1
    id_s, ood_s = np.arange(1.0, 21.0), np.array([0.5, 2.5, 18.5, 30.0])
    assert ood_metrics(id_s, ood_s)["fpr95"] == 0.75
    # 10 ID: recalls 0.9 and 1.0 are equally far from 0.95 in exact arithmetic, but in float64
    # |0.9 - 0.95| < |1.0 - 0.95|, so the reference (and we) take recall 0.9, threshold 2: only the
    # OOD 5.0 is accepted (recall 1.0 would also accept the OOD 1.0 tied with ID 1)
    assert abs(0.9 - 0.95) < abs(1.0 - 0.95)
    assert fpr_at_tpr(np.arange(1.0, 11.0), np.array([0.5, 1.0, 5.0]), 0.95) == 1 / 3


def test_perfect_and_inverted_separation():
    good = ood_metrics(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert good == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    bad = ood_metrics(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
    assert bad["auroc"] == 0.0 and bad["fpr95"] == 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ((np.array([]), np.array([1.0])), "id_scores is empty"),
        ((torch.tensor([1.0]), torch.tensor([])), "ood_scores is empty"),
        ((np.array([1.0, np.nan]), np.array([0.0])), "id_scores contains NaN"),
        ((torch.tensor([1.0]), torch.tensor([float("nan")])), "ood_scores contains NaN"),
    ],
)
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(*bad)


def test_bad_convention_raises():
    with pytest.raises(ValueError, match="convention"):
        ood_metrics([1.0], [0.0], "nope")
    with pytest.raises(ValueError, match="convention"):
        OODMetrics(convention="nope")


def labelled(seed, decimals=1):
    """Shuffled scores, ID flags and item indices (each item's position within its own set)."""
    id_s, ood_s = random_scores(seed, decimals=decimals)
    scores = torch.tensor(np.r_[id_s, ood_s])
    is_id = torch.tensor(np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]).bool()
    index = torch.tensor(np.r_[np.arange(len(id_s)), np.arange(len(ood_s))])
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    return scores[perm], is_id[perm], index[perm], id_s, ood_s


@pytest.mark.parametrize("convention", ["neglabel", "openood"])
def test_metric_over_updates_equals_function(convention):
    scores, is_id, index, id_s, ood_s = labelled(4)
    metric = OODMetrics(convention=convention)
    for chunk_s, chunk_y, chunk_i in zip(scores.split(64), is_id.split(64), index.split(64)):
        metric.update(chunk_s, chunk_y, chunk_i)
    assert metric.compute() == ood_metrics(id_s, ood_s, convention)


def test_metric_two_process_cat_equals_function_with_padded_repeats():
    scores, is_id, index, id_s, ood_s = labelled(5)

    # torchmetrics' real sync path, with all_gather replaced by handing over rank 1's states
    def gather(tensor, group=None):
        theirs = {torch.float64: ranks[1].scores, torch.uint8: ranks[1].is_id, torch.int64: ranks[1].index}
        return [tensor, dim_zero_cat(theirs[tensor.dtype])]

    ranks = [OODMetrics(dist_sync_fn=gather, distributed_available_fn=lambda: True), OODMetrics()]
    chunks = list(zip(scores.split(50), is_id.split(50), index.split(50)))
    for i, chunk in enumerate(chunks):
        ranks[i % 2].update(*chunk)  # interleaved, as a distributed sampler deals batches
    # the sampler pads the shorter rank with repeats of the first items: they must count once
    ranks[len(chunks) % 2].update(*(t[:3] for t in chunks[0]))
    assert ranks[0].compute() == ood_metrics(id_s, ood_s)

    # and the plain concatenation of both ranks' states
    ranks[1].merge_state(ranks[0])
    assert ranks[1].compute() == ood_metrics(id_s, ood_s)


def test_metric_keeps_raw_scores():
    scores, is_id, index, _, _ = labelled(6, decimals=None)
    shifted = scores * 0.5 + 7.5  # roughly 5..10: a sigmoid would squash these differently
    a, b = OODMetrics(), OODMetrics()
    a.update(shifted, is_id, index)
    b.update(shifted - 7.5, is_id, index)
    assert a.compute() == b.compute()
    # one batch inside [0, 1] and one outside: a per-update sigmoid would mix two scales
    c = OODMetrics()
    inside = (scores - scores.min()) / (scores.max() - scores.min())
    half = len(scores) // 2
    c.update(inside[:half], is_id[:half], index[:half])
    c.update(inside[half:] * 10 + 5, is_id[half:], index[half:])
    mixed = torch.cat([inside[:half], inside[half:] * 10 + 5])
    assert c.compute() == ood_metrics(mixed[is_id], mixed[~is_id])


def test_metric_rejects_bad_shapes_and_missing_class():
    metric = OODMetrics()
    with pytest.raises(ValueError, match=r"\[B\]"):
        metric.update(torch.zeros(3), torch.ones(4, dtype=torch.bool), torch.arange(4))
    with pytest.raises(ValueError, match=r"\[B\]"):
        metric.update(torch.zeros(4), torch.ones(4, dtype=torch.bool), torch.arange(3))
    metric.update(torch.rand(4), torch.ones(4, dtype=torch.bool), torch.arange(4))
    with pytest.raises(ValueError, match="ood_scores is empty"):
        metric.compute()
