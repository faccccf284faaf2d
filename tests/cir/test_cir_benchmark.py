"""The ShapesWorld CIR benchmark (`ShapesCIRBenchmark`): gallery and query bookkeeping, CIRCO-style
ground-truth sets against a brute-force check of every gallery scene, the subset chance level, and
its metrics against a plain Python computation. Scene graphs only (a few renders): fast."""

from __future__ import annotations

import random

import pytest
import torch

from xclip.cir.benchmark import ShapesCIRBenchmark
from xclip.cir.scoring import benchmark_metrics, per_category_recall
from xclip.data.shapes import CIR_KINDS, object_mask

N_SETS, N_CIRCO = 5, 4


@pytest.fixture(scope="module")
def bench() -> ShapesCIRBenchmark:
    return ShapesCIRBenchmark(6 * N_SETS, 1000, 64, "val", n_circo=N_CIRCO)


def test_gallery_holds_every_set_and_the_planted_images_once(bench):
    assert len(bench) == 6 * N_SETS + N_CIRCO
    assert bench.n_gallery == 7 * N_SETS + 5 * N_CIRCO == len(set(bench.gallery_keys))
    targets, references = bench.target_index(), bench.reference_index()
    for i, q in enumerate(bench.queries[: 6 * N_SETS]):
        r, k = divmod(i, 6)
        assert q.category == CIR_KINDS[k] and not q.ground_truth
        assert list(q.members) == [bench.gallery_keys[7 * r + j] for j in range(7)]
        assert int(references[i]) == 7 * r and int(targets[i]) == 7 * r + 1 + k
        assert q.captions == (bench.single.reference_set(r).captions[k],)
        assert bench.gallery_scene(int(targets[i])) == bench.single.reference_set(r).variants[k]
    for q in bench.queries[6 * N_SETS :]:
        assert q.category == "circo" and bench.index_of(q.reference) == -1  # the reference is not in the gallery
        assert q.ground_truth[0] == q.target


def test_images_are_the_scenes_the_bookkeeping_names(bench):
    ref = bench.reference_image(6)  # set 1
    assert torch.equal(ref, bench.gallery_image(7))
    assert torch.equal(bench.target_image(8), bench.gallery_image(7 + 1 + 2))
    circo_ref = bench.reference_image(6 * N_SETS)
    assert circo_ref.shape == (3, 64, 64) and not any(
        torch.equal(circo_ref, bench.gallery_image(g)) for g in range(bench.n_gallery)
    )


def test_circo_ground_truths_are_exactly_the_gallery_images_that_satisfy_the_caption(bench):
    for q in range(6 * N_SETS, len(bench)):
        query = bench.queries[q]
        words = query.captions[0].split()  # "shows a <size> <colour> one <background phrase>"
        size, colour = words[2], words[3]
        where = " ".join(words[5:])
        shape = bench.scenes(q)[0].objects[0].shape  # the reference gives the shape
        brute = []
        for g in range(bench.n_gallery):
            scene = bench.gallery_scene(g).to_dict()
            on = {
                "on water": "water",
                "on land": "land",
                "in the sky": "sky",
                "on sand": "sand",
                "on a plain background": "plain",
            }[where]
            if scene["background"] == on and any(
                (o["shape"], o["colour"], o["size"]) == (shape, colour, size) for o in scene["objects"]
            ):
                brute.append(g)
        truth = bench.ground_truth_index()[q]
        assert sorted(truth) == brute and truth[0] == bench.index_of(query.target)
        assert len(truth) >= 3  # the planted ones at least
        planted = [
            bench.index_of(k) for k in bench.gallery_keys if k.startswith(query.target.rsplit("/", 1)[0] + "/gt")
        ]
        negatives = [
            bench.index_of(k) for k in bench.gallery_keys if k.startswith(query.target.rsplit("/", 1)[0] + "/neg")
        ]
        assert set(planted) <= set(truth) and not set(negatives) & set(truth) and len(negatives) == 2


def ranking_from_scores(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, dim=1, descending=True, stable=True)


def brute_force_metrics(bench: ShapesCIRBenchmark, ranked: torch.Tensor) -> dict[str, float]:
    """CIRR's and CIRCO's definitions written out with Python lists."""
    hits = {f"R@{k}": 0 for k in (1, 5, 10, 50)} | {f"R_subset@{k}": 0 for k in (1, 2, 3)}
    aps = {k: [] for k in (5, 10, 25, 50)}
    n_single = 0
    for q, query in enumerate(bench.queries):
        row = [int(g) for g in ranked[q]]
        if query.ground_truth:
            gts = {bench.index_of(k) for k in query.ground_truth}
            for k, values in aps.items():
                precisions = [sum(g in gts for g in row[: i + 1]) / (i + 1) for i in range(k) if row[i] in gts]
                values.append(sum(precisions) / min(len(gts), k))
            continue
        n_single += 1
        ref, tgt = bench.index_of(query.reference), bench.index_of(query.target)
        row = [g for g in row if g != ref]
        for k in (1, 5, 10, 50):
            hits[f"R@{k}"] += tgt in row[:k]
        members = {bench.index_of(m) for m in query.members}
        subset = [g for g in row if g in members]
        for k in (1, 2, 3):
            hits[f"R_subset@{k}"] += tgt in subset[:k]
    out = {k: v / n_single for k, v in hits.items()}
    out.update({f"mAP@{k}": sum(v) / len(v) for k, v in aps.items()})
    return out


def test_metrics_equal_a_brute_force_computation(bench):
    torch.manual_seed(0)
    ranked = ranking_from_scores(torch.randn(len(bench), bench.n_gallery))
    got = benchmark_metrics(bench, torch.arange(len(bench)), ranked)
    expected = brute_force_metrics(bench, ranked)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_a_method_blind_to_the_caption_is_exactly_at_the_subset_chance_level(bench):
    """Every set is queried once per kind, so any ranking that depends on the reference alone puts
    each set's best variant first for exactly one of its six queries."""
    assert bench.subset_chance() == pytest.approx({"R_subset@1": 1 / 6, "R_subset@2": 2 / 6, "R_subset@3": 3 / 6})
    single = torch.arange(6 * N_SETS)
    for seed in range(3):
        gen = random.Random(seed)
        per_reference = {}
        rows = []
        for q in range(len(bench)):
            ref = bench.queries[q].reference
            if ref not in per_reference:  # one score vector per reference image, whatever the caption
                per_reference[ref] = torch.tensor([gen.random() for _ in range(bench.n_gallery)])
            rows.append(per_reference[ref])
        ranked = ranking_from_scores(torch.stack(rows))
        got = benchmark_metrics(bench, single, ranked[single])
        for k in (1, 2, 3):
            assert got[f"R_subset@{k}"] == pytest.approx(k / 6, abs=1e-12)


def test_an_oracle_scores_one_and_per_kind_recall_splits_the_queries(bench):
    scores = torch.zeros(len(bench), bench.n_gallery)
    for q, query in enumerate(bench.queries):
        for rank, key in enumerate(query.ground_truth or (query.target,)):
            scores[q, bench.index_of(key)] = 10.0 - rank
    ranked = ranking_from_scores(scores)
    got = benchmark_metrics(bench, torch.arange(len(bench)), ranked)
    assert all(v == pytest.approx(1.0) for v in got.values()), got
    per_kind = per_category_recall(bench, torch.arange(len(bench)), ranked, 1, subset=True)
    assert per_kind == dict.fromkeys(CIR_KINDS, 1.0)  # CIRCO-style queries are not a kind


def test_validation_and_test_benchmarks_share_no_scene():
    val = ShapesCIRBenchmark(60, 1000, 64, "val", n_circo=10)
    test = ShapesCIRBenchmark(60, 1000, 64, "test", n_circo=10)
    val_scenes = {val.gallery_scene(g) for g in range(val.n_gallery)}
    assert not val_scenes & {test.gallery_scene(g) for g in range(test.n_gallery)}
    assert len(val_scenes) == val.n_gallery


def test_truth_masks_follow_the_edit():
    bench = ShapesCIRBenchmark(6 * 8, 1000, 64, "val")
    for q in range(len(bench)):
        truth, (_, tgt, kind) = bench.truth(q), bench.scenes(q)
        assert truth.kind == kind
        if kind == "background":
            assert not truth.modified.any() and truth.shared.any()
        elif kind == "count":  # both copies are named ("two red circles")
            cir_set = bench.single.reference_set(q // 6)
            noun = cir_set.reference.objects[cir_set.edited].noun
            assert int(truth.modified.sum()) == sum(
                int(object_mask(o, 64).sum()) for o in tgt.objects if o.noun == noun
            )
        else:
            assert truth.modified.any() and not (truth.modified & truth.target_other).any()
            assert truth.reference_other.any()  # the edited object's old look


def test_benchmark_needs_queries():
    with pytest.raises(ValueError, match="needs queries"):
        ShapesCIRBenchmark(0, 1000, 64, "val", n_circo=0)


def test_the_cache_fingerprint_follows_the_scene_graphs():
    a, b = ShapesCIRBenchmark(12, 1000, 64, "val"), ShapesCIRBenchmark(12, 1000, 64, "val")
    assert a.fingerprint() == b.fingerprint()
    b._scenes[3] = b._scenes[4]  # what a changed generator would do to the same seed
    assert a.fingerprint()["scenes_sha256"] != b.fingerprint()["scenes_sha256"]
