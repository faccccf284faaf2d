"""CIR loaders on fixtures in the datasets' exact formats, their errors, the scoring helpers and
the test-submission files."""

from __future__ import annotations

import json

import pytest
import torch
from cir_fixtures import write_circo, write_cirr, write_fashioniq

from xclip.cir.benchmark import load_cir_image, target_pad
from xclip.cir.loaders import CIRAnnotationError, load_circo, load_cirr, load_fashioniq
from xclip.cir.scoring import (
    benchmark_metrics,
    coverage,
    coverage_note,
    rank_queries,
    write_submissions,
)
from xclip.metrics import circo_map_at_k


def test_cirr_val_and_test1(tmp_path):
    written = write_cirr(tmp_path)
    bench = load_cirr(tmp_path, "val", image_size=32)
    names, entries = written["val"]
    assert bench.name == "cirr" and bench.split == "val" and bench.gallery_keys == names
    assert [q.query_id for q in bench.queries] == ["10", "11", "12", "13", "14"]
    assert bench.target_index().tolist() == [names.index(e["target_hard"]) for e in entries]
    assert bench.reference_index().tolist() == [names.index(e["reference"]) for e in entries]
    assert bench.members_index()[1].tolist() == [names.index(m) for m in entries[1]["img_set"]["members"]]
    assert bench.queries[0].captions == ("has 1 more dogs",)
    image = bench.gallery_image(0)
    assert image.shape == (3, 32, 32) and 0 <= float(image.min()) and float(image.max()) <= 1
    test = load_cirr(tmp_path, "test", image_size=32)  # 'test' is CIRR's test1
    assert test.split == "test1" and not test.has_targets() and test.target_index().tolist() == [-1] * 5


def test_circo_val_and_test(tmp_path):
    written = write_circo(tmp_path)
    bench = load_circo(tmp_path, "val", image_size=32)
    ids = [str(i) for i in written["ids"]]
    assert bench.gallery_keys == ids and len(bench) == 5
    assert bench.ground_truth_index()[2] == [ids.index(str(g)) for g in written["val"][2]["gt_img_ids"]]
    assert bench.target_index().tolist() == [q + 1 for q in range(5)]
    assert bench.reference_index().tolist() == list(range(5))
    test = load_circo(tmp_path, "test", image_size=32)
    assert [q.query_id for q in test.queries] == ["100", "101", "102"] and not test.has_targets()


def test_fashioniq_categories_each_rank_their_own_gallery(tmp_path):
    written = write_fashioniq(tmp_path)
    bench = load_fashioniq(tmp_path, "val", image_size=32)
    assert bench.categories() == ["dress", "shirt", "toptee"] and len(bench) == 9
    assert bench.queries[0].captions == ("is more dressy.", " has buttons? ")
    assert bench.gallery_keys[:6] == [f"dress/{n}" for n in written["dress"][0]]
    emb = torch.nn.functional.normalize(
        torch.randn(bench.n_gallery, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    queries = torch.arange(len(bench))
    ranked = rank_queries(bench, queries, emb[bench.target_index()], torch.arange(bench.n_gallery), emb, top=None)
    for q in range(len(bench)):  # each row holds only its category's images; the target ranks first
        cat = bench.queries[q].category
        assert {bench.gallery_categories[int(g)] for g in ranked[q]} == {cat}
        assert int(ranked[q, 0]) == int(bench.target_index()[q])
    metrics = benchmark_metrics(bench, queries, ranked, ks=(1, 5))
    assert metrics == {
        "dress_R@1": 1.0,
        "dress_R@5": 1.0,
        "shirt_R@1": 1.0,
        "shirt_R@5": 1.0,
        "toptee_R@1": 1.0,
        "toptee_R@5": 1.0,
        "R@1": 1.0,
        "R@5": 1.0,
    }


LOADERS = {
    "cirr": (write_cirr, load_cirr),
    "circo": (write_circo, load_circo),
    "fashioniq": (write_fashioniq, load_fashioniq),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_unreadable_images_count_as_misses_over_every_query(tmp_path, name):
    write, load = LOADERS[name]
    write(tmp_path)
    bench = load(tmp_path, "val", image_size=32)
    unread = {bench.queries[0].reference, bench.queries[3].target}  # a reference and a target: unreadable files
    gallery = torch.tensor([i for i, k in enumerate(bench.gallery_keys) if k not in unread])
    evaluated = [q for q, query in enumerate(bench.queries) if query.reference not in unread]
    emb = torch.nn.functional.normalize(
        torch.randn(bench.n_gallery, 16, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    qi = torch.tensor(evaluated)
    # each query's embedding is its target's: the target ranks first wherever it was read
    ranked = rank_queries(bench, qi, emb[bench.target_index()[qi]], gallery, emb[gallery], top=None)
    metrics = benchmark_metrics(bench, qi, ranked, ks=(1, 2), gallery_index=gallery)
    hit = [q in evaluated and query.target not in unread for q, query in enumerate(bench.queries)]
    assert sum(hit) < len(evaluated) < len(bench)
    if name == "fashioniq":
        cats = ("dress", "shirt", "toptee")
        per_cat = {c: sum(h for h, query in zip(hit, bench.queries) if query.category == c) / 3 for c in cats}
        assert metrics["R@1"] == pytest.approx(sum(per_cat.values()) / 3)
        assert all(metrics[f"{c}_R@1"] == pytest.approx(per_cat[c]) for c in cats)
    else:
        assert metrics["R@1"] == metrics["R@2"] == pytest.approx(sum(hit) / len(bench))  # not / len(evaluated)
    if name == "cirr":
        assert metrics["R_subset@1"] == pytest.approx(sum(hit) / len(bench))
    if name == "circo":  # each evaluated query's AP as usual (its unread ground truths never found), / every query
        gts = bench.ground_truth_index()
        expected = circo_map_at_k(ranked, [gts[q] for q in evaluated], ks=(1, 2))
        assert metrics["mAP@2"] == pytest.approx(expected["mAP@2"] * len(evaluated) / len(bench))
    cov = coverage(bench, qi, gallery, unreadable_queries=[0])
    ids = [query.query_id for query in bench.queries]
    assert (cov["n_queries"], cov["n_evaluated"], cov["n_gallery_read"]) == (len(bench), len(evaluated), len(gallery))
    assert cov["not_evaluated"]["unreadable_reference"] == [ids[0]]
    assert cov["not_evaluated"]["not_loaded"] == [ids[q] for q in range(1, len(bench)) if q not in evaluated]
    assert cov["target_not_read"] == [
        ids[q] for q, query in enumerate(bench.queries) if unread & ({query.target} | set(query.ground_truth))
    ]
    assert coverage_note(cov).startswith(f"{len(evaluated)} of {len(bench)} queries evaluated, ")


def test_missing_image_errors_name_the_file_and_the_entry(tmp_path):
    _, entries = write_cirr(tmp_path)["val"]
    (tmp_path / "dev" / f"{entries[3]['reference']}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"dev-3-0-img1.*cap.rc2.val.json entry \[3\] \(pairid 13\)"):
        load_cirr(tmp_path, "val")
    root = tmp_path / "circo"
    write_circo(root)
    next((root / "COCO2017_unlabeled" / "unlabeled2017").glob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match=r"000000001000.jpg"):
        load_circo(root, "val")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e[2].pop("caption"), r"cap.rc2.val.json: entry \[2\] \(pairid 12\) has no 'caption' field"),
        (lambda e: e[1].update(caption=""), r"entry \[1\] \(pairid 11\) field 'caption' is empty"),
        (lambda e: e[4].update(reference=5), r"entry \[4\] \(pairid 14\) field 'reference' must be str"),
        (
            lambda e: e[0].update(target_hard="nowhere"),
            r"entry \[0\] \(pairid 10\) field 'target_hard' names image 'nowhere'",
        ),
        (
            lambda e: e[3]["img_set"].update(members="abc"),
            r"entry \[3\] \(pairid 13\) img_set field 'members' must be a list",
        ),
        (lambda e: e.__setitem__(1, "oops"), r"entry \[1\] is a str, expected an object"),
    ],
)
def test_malformed_cirr_entries_are_named_by_index(tmp_path, mutate, message):
    write_cirr(tmp_path)
    path = tmp_path / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    mutate(entries)
    path.write_text(json.dumps(entries))
    with pytest.raises(CIRAnnotationError, match=message):
        load_cirr(tmp_path, "val")


def _rewrite(path, mutate) -> None:
    entries = json.loads(path.read_text())
    mutate(entries)
    path.write_text(json.dumps(entries))


def test_cirr_refuses_a_repeated_pairid_and_a_target_equal_to_its_reference(tmp_path):
    write_cirr(tmp_path)
    for split, _field in (("val", "target_hard"), ("test1", None)):
        path = tmp_path / "cirr" / "captions" / f"cap.rc2.{split}.json"
        original = path.read_text()
        _rewrite(path, lambda e: e[3].update(pairid=11))
        with pytest.raises(
            CIRAnnotationError, match=rf"cap.rc2.{split}.json: entry \[3\] repeats pairid 11 of entry \[1\]"
        ):
            load_cirr(tmp_path, split)
        path.write_text(original)
    path = tmp_path / "cirr" / "captions" / "cap.rc2.val.json"
    _rewrite(path, lambda e: e[2].update(target_hard=e[2]["reference"]))
    with pytest.raises(
        CIRAnnotationError,
        match=r"cap.rc2.val.json: entry \[2\] \(pairid 12\) field 'target_hard' is "
        r"the query's own reference 'dev-2-0-img0'",
    ):
        load_cirr(tmp_path, "val")


def test_circo_refuses_a_repeated_id_and_repeated_ground_truths(tmp_path):
    write_circo(tmp_path)
    path = tmp_path / "annotations" / "val.json"
    original = path.read_text()
    _rewrite(path, lambda e: e[4].update(id=0))
    with pytest.raises(CIRAnnotationError, match=r"val.json: entry \[4\] repeats id 0 of entry \[0\]"):
        load_circo(tmp_path, "val")
    path.write_text(original)
    _rewrite(path, lambda e: e[0].update(gt_img_ids=[e[0]["target_img_id"]] * 3))  # mAP@5 was 1/3, not 1
    with pytest.raises(
        CIRAnnotationError,
        match=r"val.json: entry \[0\] \(id 0\) field 'gt_img_ids' lists image 1007 "
        r"more than once",
    ):
        load_circo(tmp_path, "val")
    path = tmp_path / "annotations" / "test.json"
    _rewrite(path, lambda e: e[2].update(id=100))
    with pytest.raises(CIRAnnotationError, match=r"test.json: entry \[2\] repeats id 100 of entry \[0\]"):
        load_circo(tmp_path, "test")


@pytest.mark.parametrize("caption", ["...", "?", " , "])
def test_fashioniq_refuses_a_caption_that_strips_to_nothing(tmp_path, caption):
    write_fashioniq(tmp_path, categories=("shirt",))
    _rewrite(tmp_path / "captions" / "cap.shirt.val.json", lambda e: e[1].update(captions=["is red", caption]))
    with pytest.raises(
        CIRAnnotationError,
        match=r"cap.shirt.val.json: entry \[1\] field 'captions'\[1\] is .* nothing is "
        r"left once '.\?, ' are stripped",
    ):
        load_fashioniq(tmp_path, "val", categories=["shirt"])


def test_malformed_circo_fashioniq_and_json(tmp_path):
    write_circo(tmp_path / "circo")
    path = tmp_path / "circo" / "annotations" / "val.json"
    entries = json.loads(path.read_text())
    entries[3]["gt_img_ids"] = entries[3]["gt_img_ids"][::-1] + [1]
    path.write_text(json.dumps(entries))
    with pytest.raises(CIRAnnotationError, match=r"val.json: entry \[3\] \(id 3\) field 'gt_img_ids' names image '1'"):
        load_circo(tmp_path / "circo", "val")
    path.write_text("[{")
    with pytest.raises(CIRAnnotationError, match="not valid JSON"):
        load_circo(tmp_path / "circo", "val")
    write_fashioniq(tmp_path / "fiq", categories=("dress",))
    path = tmp_path / "fiq" / "captions" / "cap.dress.val.json"
    entries = json.loads(path.read_text())
    entries[2]["captions"] = ["only one"]
    path.write_text(json.dumps(entries))
    with pytest.raises(CIRAnnotationError, match=r"cap.dress.val.json: entry \[2\] field 'captions' must hold 2 items"):
        load_fashioniq(tmp_path / "fiq", "val", categories=["dress"])
    with pytest.raises(ValueError, match="categories must be among"):
        load_fashioniq(tmp_path / "fiq", "val", categories=["hat"])


def test_submission_files(tmp_path):
    write_cirr(tmp_path / "cirr")
    bench = load_cirr(tmp_path / "cirr", "test1")
    names = bench.gallery_keys
    ranked = torch.stack([torch.roll(torch.arange(len(names)), -q) for q in range(len(bench))])  # query q: q, q+1, ...
    paths = write_submissions(bench, torch.arange(len(bench)), ranked, tmp_path / "out", "run")
    full, subset = (json.loads(p.read_text()) for p in paths)
    assert paths[1].name == "subset_run.json"
    assert full["version"] == subset["version"] == "rc2"
    assert full["metric"] == "recall" and subset["metric"] == "recall_subset"
    for q, entry in enumerate(bench.queries):
        expected = [
            names[(q + j) % len(names)] for j in range(len(names)) if names[(q + j) % len(names)] != entry.reference
        ]
        assert full[entry.query_id] == expected[:50]
        assert subset[entry.query_id] == [n for n in expected if n in entry.members][:3]
    write_circo(tmp_path / "circo")
    circo = load_circo(tmp_path / "circo", "test")
    ranked = torch.arange(circo.n_gallery).flip(0)[None].repeat(len(circo), 1)
    (path,) = write_submissions(circo, torch.arange(len(circo)), ranked, tmp_path / "out", "circo")
    sub = json.loads(path.read_text())
    assert set(sub) == {"100", "101", "102"} and sub["101"] == circo.gallery_keys[::-1][:50]


def test_target_pad_matches_searle(tmp_path):
    from PIL import Image

    wide = Image.new("RGB", (100, 40), (255, 255, 255))
    padded = target_pad(wide, 1.25)  # 100 / 1.25 = 80 high: 20 px of black above and below
    assert padded.size == (100, 80)
    assert padded.getpixel((50, 5)) == (0, 0, 0) and padded.getpixel((50, 40)) == (255, 255, 255)
    assert target_pad(Image.new("RGB", (50, 45)), 1.25).size == (50, 45)  # below the ratio: untouched
    wide.save(tmp_path / "w.png")
    assert load_cir_image(tmp_path / "w.png", 16).shape == (3, 16, 16)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert load_cir_image(tmp_path / "bad.png", 16) is None
