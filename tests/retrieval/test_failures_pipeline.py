"""End to end on ShapesWorld with the shipped tiny CLIP: validate with `RetrievalExplanationCallback`
-> failures -> cards -> sheets -> auto-labels -> merge -> agreement -> summary -> improvements,
checked against counts computed independently from the module's embeddings and the scene graphs."""

import csv
import json
from collections import Counter
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.metrics import cohen_kappa_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xclip.retrieval import RetrievalExplanationCallback, RetrievalModule
from xclip.retrieval.callback import _row_captions
from xclip.retrieval.datamodule import RetrievalDataModule
from xclip.retrieval.failures.autolabel import autolabel
from xclip.retrieval.failures.report import write_annotation_report
from xclip.retrieval.failures.sheets import fill_sheets
from xclip.retrieval.failures.taxonomy import category
from xclip.retrieval.gallery import ShapesGallery

N_IMAGES, N_FAILURES, N_ANNOTATORS, PER_ANNOTATOR, OVERLAP = 250, 24, 3, 5, 6
N_METHODS = 5  # baseline, templates x {mean, max, logsumexp}, rerank


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("failure_run")
    callback = RetrievalExplanationCallback(
        max_items=N_FAILURES,
        seed=0,
        n_annotators=N_ANNOTATORS,
        per_annotator=PER_ANNOTATOR,
        overlap=OVERLAP,
        card_size=64,
        log_cards=2,
    )
    module = RetrievalModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, RetrievalDataModule(source="shapes", n=N_IMAGES, seed=0, batch_size=125), verbose=False)
    yield SimpleNamespace(trainer=trainer, module=module, dir=root / "run" / "version_0")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected(run):
    """Failures and auto-labels recomputed from the embeddings by a full stable sort."""
    emb, gallery = run.module.gallery_embeddings, run.module.gallery
    texts, _ = gallery.all_captions()
    scores = emb.text_emb @ emb.image_emb.T
    top = torch.sort(-scores, dim=1, stable=True).indices[:, 0]
    failing = torch.nonzero(top != emb.text_to_image).flatten().tolist()
    labels = {
        t: autolabel(texts[t], gallery.scene(int(emb.text_to_image[t])), gallery.scene(int(top[t]))) for t in failing
    }
    return SimpleNamespace(failing=failing, top=top, labels=labels, n_captions=len(texts))


def test_failures_csv_holds_every_top1_failure(run, expected):
    rows = read_rows(run.dir / "failures" / "val" / "failures.csv")
    assert [int(r["text_index"]) for r in rows] == expected.failing
    assert len(rows) >= N_FAILURES, "the sample sizes of these tests need at least 24 failures in this gallery"
    gallery = run.module.gallery
    for r in rows:
        t = int(r["text_index"])
        assert int(r["retrieved_image"]) == int(expected.top[t])
        assert r["gt_key"] == gallery.key(int(r["gt_image"])) and r["retrieved_key"] == gallery.key(
            int(r["retrieved_image"])
        )
        assert r["auto_label"] == expected.labels[t]
    assert len(rows) / expected.n_captions == pytest.approx(1 - run.module.recall_values["val/retrieval/t2i_R@1"])


def test_cards_and_sheets_have_the_configured_counts(run, expected):
    failures_dir = run.dir / "failures" / "val"
    cards = sorted(p.stem for p in (failures_dir / "cards").glob("*.png"))
    assert len(cards) == N_FAILURES
    assignment = json.loads((failures_dir / "sheets" / "assignment.json").read_text())
    assert len(assignment["overlap"]) == OVERLAP
    ids = []
    for k in range(1, N_ANNOTATORS + 1):
        rows = read_rows(failures_dir / "sheets" / f"annotator_{k}.csv")
        assert len(rows) == PER_ANNOTATOR + OVERLAP
        assert set(assignment["overlap"]) <= {r["failure_id"] for r in rows}
        assert all((failures_dir / "sheets" / r["card"]).is_file() and r["label"] == "" for r in rows)
        ids += [r["failure_id"] for r in rows]
    assert len(set(ids)) == N_ANNOTATORS * PER_ANNOTATOR + OVERLAP and set(ids) <= set(cards)
    summary = json.loads((failures_dir / "index.json").read_text())
    assert (summary["n_failures"], summary["n_sampled"], summary["n_cards"]) == (
        len(expected.failing),
        N_FAILURES,
        N_FAILURES,
    )
    assert (summary["per_annotator"], summary["overlap"]) == (PER_ANNOTATOR, OVERLAP)


def test_auto_labelled_sheets_merge_with_perfect_agreement(run, expected):
    auto = run.dir / "failures" / "val" / "auto"
    merged = read_rows(auto / "merged.csv")
    n_unique = N_ANNOTATORS * PER_ANNOTATOR + OVERLAP
    assert len(merged) == n_unique
    assert all(r["label"] == expected.labels[int(r["text_index"])] for r in merged)
    assert sum(r["n_annotators"] == str(N_ANNOTATORS) for r in merged) == OVERLAP
    overlap_categories = {r["category"] for r in merged if r["n_annotators"] == str(N_ANNOTATORS)}
    assert len(overlap_categories) >= 2  # kappa is defined on this overlap set
    agreement = read_rows(auto / "agreement.csv")
    assert len(agreement) == 2 * (3 + 1)  # 3 pairs + Fleiss, on categories and on full labels
    assert all(float(r["kappa"]) == 1.0 and int(r["n_items"]) == OVERLAP for r in agreement)
    distribution = {r["label"]: int(r["count"]) for r in read_rows(auto / "distribution.csv")}
    want = Counter(r["label"] for r in merged)
    assert distribution == {label: want.get(label, 0) for label in distribution}
    ambiguity = read_rows(auto / "ambiguity.csv")[0]
    n_amb = sum(label.startswith("Ambiguous") for label in (r["label"] for r in merged))
    assert (int(ambiguity["ambiguous"]), int(ambiguity["clear"])) == (n_amb, n_unique - n_amb)


def test_one_perturbed_annotator_gives_the_known_kappas(run, tmp_path):
    auto_sheets = run.dir / "failures" / "val" / "auto" / "sheets"
    assignment = json.loads((auto_sheets / "assignment.json").read_text())
    rows = {r["failure_id"]: r["label"] for r in read_rows(auto_sheets / "annotator_1.csv")}
    overlap = sorted(assignment["overlap"])
    changed = overlap[0]
    new = "Context" if category(rows[changed]) != "Context" else "Count"
    fill_sheets(auto_sheets, {"annotator_3": {changed: new}}, tmp_path / "sheets")
    report = write_annotation_report(tmp_path / "sheets", tmp_path / "report")
    kappa = {r["annotators"]: r for r in report["agreement"] if r["level"] == "category"}
    truth = [category(rows[f]) for f in overlap]
    perturbed = [new if f == changed else c for f, c in zip(overlap, truth)]
    assert kappa["annotator_1+annotator_2"]["kappa"] == 1.0
    assert kappa["annotator_1+annotator_3"]["observed"] == pytest.approx((OVERLAP - 1) / OVERLAP)
    assert kappa["annotator_1+annotator_3"]["kappa"] == pytest.approx(cohen_kappa_score(truth, perturbed), abs=1e-12)
    assert kappa["annotator_2+annotator_3"]["kappa"] == kappa["annotator_1+annotator_3"]["kappa"]
    # Fleiss by hand: item agreement P_i = 1 except the changed item (2 of 3 agree: P = 2/6)
    p_bar = (OVERLAP - 1 + 2 / 6) / OVERLAP
    ratings = Counter(truth * 2 + perturbed)
    p_e = sum((n / (3 * OVERLAP)) ** 2 for n in ratings.values())
    assert kappa["all"]["kappa"] == pytest.approx((p_bar - p_e) / (1 - p_e), abs=1e-12)
    assert kappa["all"]["kappa"] < 1.0
    merged = {r["failure_id"]: r for r in read_rows(tmp_path / "report" / "merged.csv")}
    assert merged[changed]["n_agree"] == "2" and merged[changed]["label"] == rows[changed]


def test_improvements_table_per_method_and_category(run, expected):
    rows = read_rows(run.dir / "failures" / "val" / "improvements.csv")
    label_counts = Counter(expected.labels.values())
    subsets = ["all", "failures", *(f"failures:{label}" for label in label_counts)]
    assert len(rows) == N_METHODS * len(subsets)
    assert {r["method"] for r in rows} == {
        "baseline",
        "templates_mean",
        "templates_max",
        "templates_logsumexp",
        "rerank_tfidf",
    }
    by = {(r["method"], r["subset"]): r for r in rows}
    assert float(by["baseline", "all"]["R@1"]) == pytest.approx(run.module.recall_values["val/retrieval/t2i_R@1"])
    assert float(by["baseline", "all"]["R@5"]) == pytest.approx(run.module.recall_values["val/retrieval/t2i_R@5"])
    assert float(by["baseline", "failures"]["R@1"]) == 0.0
    assert by["baseline", "failures"]["n_queries"] == str(len(expected.failing))
    for label, n in label_counts.items():
        assert by["baseline", f"failures:{label}"]["n_queries"] == str(n)
        assert float(by["baseline", f"failures:{label}"]["R@1"]) == 0.0
    # the ShapesWorld paraphrase shares almost every word with the query: re-ranking fixes failures
    assert float(by["rerank_tfidf", "failures"]["R@1"]) > 0.3
    assert (run.dir / "failures" / "val" / "improvements.png").read_bytes()[:4] == b"\x89PNG"


def test_cards_and_improvements_are_logged_to_tensorboard(run):
    events = EventAccumulator(str(run.dir), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert sum(t.startswith("val/retrieval/card/") for t in tags) == 2
    assert "val/retrieval/improvements/all" in tags


def test_labels_csv_defines_the_improvement_subsets(run, expected, tmp_path):
    merged_csv = run.dir / "failures" / "val" / "auto" / "merged.csv"
    callback = RetrievalExplanationCallback(
        max_items=4,
        n_annotators=1,
        per_annotator=4,
        overlap=0,
        cards=False,
        autolabel=False,
        labels_csv=str(merged_csv),
        poolings=["max"],
        templates=["{}", "a photo of {}."],
    )
    trainer = SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        logger=SimpleNamespace(log_dir=str(tmp_path)),
        loggers=[],
        default_root_dir=str(tmp_path),
        global_step=0,
    )
    summary = callback.analyse(trainer, run.module)
    merged = Counter(r["label"] for r in read_rows(merged_csv))
    subsets = {r["subset"]: r["n_queries"] for r in summary["improvements"] if r["method"] == "baseline"}
    assert subsets == {
        "all": expected.n_captions,
        "failures": len(expected.failing),
        **{f"failures:{label}": n for label, n in merged.items()},
    }
    assert {r["method"] for r in summary["improvements"]} == {"baseline", "templates_max", "rerank_tfidf"}
    assert (
        not (tmp_path / "failures" / "val" / "cards").exists() and not (tmp_path / "failures" / "val" / "auto").exists()
    )
    assert len(read_rows(tmp_path / "failures" / "val" / "sheets" / "annotator_1.csv")) == 4


def test_embedding_rows_map_back_to_gallery_captions():
    gallery = ShapesGallery(n=10, seed=3)
    image_index = torch.tensor([2, 5, 9])  # e.g. a partial validation (limit_val_batches)
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    captions, ids = _row_captions(gallery, image_index, text_to_image)
    assert ids.tolist() == [4, 5, 10, 11, 18, 19]
    assert captions == gallery.captions(2) + gallery.captions(5) + gallery.captions(9)
    with pytest.raises(ValueError, match="do not match"):
        _row_captions(gallery, image_index, text_to_image[:5])


def stub_run(tmp_path, image_emb, text_emb, text_to_image, gallery):
    module = SimpleNamespace(
        gallery=gallery,
        backbone=None,
        gallery_embeddings=SimpleNamespace(
            image_emb=image_emb, text_emb=text_emb, text_to_image=text_to_image, image_index=torch.arange(len(gallery))
        ),
    )
    trainer = SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        logger=SimpleNamespace(log_dir=str(tmp_path)),
        loggers=[],
        default_root_dir=str(tmp_path),
        global_step=0,
    )
    return trainer, module


def test_a_perfect_model_gives_empty_sheets_and_reports(tmp_path):
    gallery = ShapesGallery(n=6, seed=3)
    _, owner = gallery.all_captions()
    trainer, module = stub_run(tmp_path, torch.eye(6), torch.eye(6)[owner], owner, gallery)
    with pytest.warns(UserWarning, match="0 sampled failures"):
        summary = RetrievalExplanationCallback(improvements=False).analyse(trainer, module)
    assert (summary["n_failures"], summary["n_sampled"], summary["n_cards"]) == (0, 0, 0)
    assert (summary["per_annotator"], summary["overlap"]) == (0, 0)
    assert read_rows(tmp_path / "failures" / "val" / "failures.csv") == []
    assert read_rows(tmp_path / "failures" / "val" / "sheets" / "annotator_1.csv") == []
    assert read_rows(tmp_path / "failures" / "val" / "auto" / "merged.csv") == []
    assert read_rows(tmp_path / "failures" / "val" / "auto" / "ambiguity.csv")[0]["n_failures"] == "0"


def test_too_few_failures_shrink_the_sheets_with_a_warning(tmp_path):
    gallery = ShapesGallery(n=6, seed=3)
    _, owner = gallery.all_captions()
    text_emb = torch.eye(6)[owner]
    text_emb[[0, 2, 4]] = torch.eye(6)[[1, 3, 5]]  # captions 0, 2, 4 retrieve the next image
    trainer, module = stub_run(tmp_path, torch.eye(6), text_emb, owner, gallery)
    callback = RetrievalExplanationCallback(
        max_items=10, n_annotators=2, per_annotator=5, overlap=2, cards=False, improvements=False
    )
    with pytest.warns(UserWarning, match="per_annotator=0, overlap=2"):
        summary = callback.analyse(trainer, module)
    assert (summary["n_failures"], summary["per_annotator"], summary["overlap"]) == (3, 0, 2)
    failures = read_rows(tmp_path / "failures" / "val" / "failures.csv")
    assert [(r["text_index"], r["gt_image"], r["retrieved_image"]) for r in failures] == [
        ("0", "0", "1"),
        ("2", "1", "3"),
        ("4", "2", "5"),
    ]
    assert [len(read_rows(tmp_path / "failures" / "val" / "sheets" / f"annotator_{k}.csv")) for k in (1, 2)] == [2, 2]
