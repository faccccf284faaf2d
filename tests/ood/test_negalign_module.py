"""NegAlign wiring on the shipped tiny CLIP: one forward per batch, the module's numbers against a
direct NegLabel computation, outputs, errors, configs; the NegLabel floor on ShapesWorld."""

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from ood_fixtures import write_placesbg, write_waterbirds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xclip.backbones import load_backbone
from xclip.cli import main
from xclip.data.shapes import SpuriousShapes
from xclip.explain import GradCAM
from xclip.metrics import ood_metrics
from xclip.ood import NegAlignFeatures, NegAlignModule, NegLabelScorer, OODExplanationCallback
from xclip.ood.datamodule import OODDataModule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Module arguments for ~77 mined negatives (the shipped ShapesWorld lists), with one text
    embedding cache for the whole file so each vocabulary is encoded once."""
    return {"n_groups": 4, "m1_topk": 2, "text_cache_dir": str(tmp_path_factory.mktemp("text_cache"))}


@pytest.fixture(scope="module")
def bb(tiny_shapes):
    return tiny_shapes


@pytest.fixture(scope="module")
def images(bb):
    ds = SpuriousShapes(n=6, seed=5)
    return bb.normalize(torch.stack([ds[i]["image"] for i in range(6)]))


# ---- features: one forward -------------------------------------------------------------------
def test_features_match_standalone_gradcam_and_dense_pooling(bb, images):
    id_emb = bb.encode_text(["the nice square", "the nice circle"]).detach()
    feats = NegAlignFeatures(bb)(images, id_emb)
    with torch.no_grad():
        torch.testing.assert_close(feats.image_emb, bb.encode_image(images), atol=1e-5, rtol=1e-4)
        pred = (F.normalize(bb.encode_image(images), dim=-1) @ F.normalize(id_emb, dim=-1).T).argmax(1)
        tokens = bb.trace_image(images).patch_tokens
    assert torch.equal(feats.pred_class, pred)
    # the CAM of the predicted class, as the standalone Grad-CAM explainer computes it
    torch.testing.assert_close(feats.cam, GradCAM(bb).pair_maps(images, id_emb[pred]), atol=1e-6, rtol=1e-4)
    assert feats.cam_valid.all() and (feats.cam >= 0).all()
    # background = ln_post + proj of the mean patch token outside the dilated top-20% foreground
    bg = ~feats.fg_mask.flatten(1)
    assert (bg.sum(1) > 0).all() and (feats.fg_mask.flatten(1).float().mean(1) >= 0.2).all()
    manual = torch.stack([bb.image_head(tokens[i][bg[i]].mean(0)) for i in range(len(images))])
    torch.testing.assert_close(feats.bg_emb, manual, atol=1e-5, rtol=1e-4)


def count_vision_calls(backbone, set_attr=setattr) -> dict[str, int]:
    """Count the backbone's vision-tower entries: the traced forward and the library's encode_image."""
    calls = {"embed": 0, "encode": 0}

    def counted(key: str, fn):
        def counting(*args):
            calls[key] += 1
            return fn(*args)

        return counting

    for key, name in (("embed", "trace"), ("encode", "encode")):
        set_attr(backbone.vision, name, counted(key, getattr(backbone.vision, name)))
    return calls


def test_features_run_the_vision_tower_once(bb, images, monkeypatch):
    calls = count_vision_calls(bb, monkeypatch.setattr)
    NegAlignFeatures(bb)(images, torch.randn(2, bb.embed_dim))
    assert calls == {"embed": 1, "encode": 0}


# ---- the module on the WaterBirds / PlacesBG fixture ----------------------------------------
@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    return (
        write_waterbirds(tmp_path_factory.mktemp("waterbirds")),
        write_placesbg(tmp_path_factory.mktemp("placesbg")),
    )


def fixture_datamodule(dirs):
    return OODDataModule(
        source="waterbirds", data_root=str(dirs[0]), ood_dirs={"placesbg": str(dirs[1])}, image_size=64, batch_size=4
    )


def evaluate(module, dirs, save_dir, callbacks=(), stage="test"):
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(save_dir), name="neg"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    getattr(trainer, stage)(module, fixture_datamodule(dirs), verbose=False)
    return trainer


@pytest.fixture(scope="module")
def fixture_run(fixture_dirs, tmp_path_factory, small):
    """`xclip test` on the fixture: lambda chosen on the validation partition, test reported."""
    module = NegAlignModule(**small, breakdown_csv=True, backbone=load_backbone("xclip:tiny-shapes"))
    calls = count_vision_calls(module.backbone)  # the module's own backbone, discarded with it
    trainer = evaluate(module, fixture_dirs, tmp_path_factory.mktemp("runs"), [OODExplanationCallback(max_items=2)])
    return module, trainer, calls


def test_one_vision_forward_per_batch_for_every_variant_and_lambda(fixture_run):
    module, _, calls = fixture_run
    # calibration: 2 train images (1 batch); validation: ID 3 (1), PlacesBG 3 (1);
    # test: ID 7 (2 batches), PlacesBG 4 (1)
    assert calls == {"embed": 6, "encode": 0}
    res = module.extra_results()["ood"]
    assert len(res["per_lambda"]) == 6 and len(res["ablation"]) == 8  # M2 is unavailable on this model


def test_plain_neglabel_equals_a_direct_computation(fixture_run, fixture_dirs):
    module, trainer, _ = fixture_run
    bb, scorer = module.backbone, module.terms.scorer.neglabel
    direct = NegLabelScorer(scorer.id_emb, scorer.neg_emb, n_groups=4, seed=0)
    dm = fixture_datamodule(fixture_dirs)  # the module's batches: identical float rounding
    scores = {}
    for loader in dm.test_dataloader():
        parts = []
        for batch in loader:
            if batch["partition"] != "test":
                continue
            with torch.no_grad():
                emb = bb.trace_image(bb.normalize(batch["image"])).embedding  # the module's forward
                torch.testing.assert_close(emb, bb.encode_image(bb.normalize(batch["image"])), atol=1e-5, rtol=1e-4)
            parts.append(direct(emb.double()))
        if parts:
            scores[batch["split"]] = torch.cat(parts)
    expected = ood_metrics(scores["id"], scores["ood_placesbg"])
    res = module.extra_results()["ood"]
    assert res["variants"]["neglabel"]["ood_placesbg"] == expected
    row = next(r for r in res["ablation"] if r["name"] == "neglabel")
    assert row["metrics"]["ood_placesbg"] == expected  # all toggles off == NegLabel
    per_image = list(csv.DictReader((Path(trainer.logger.log_dir) / "test_per_image.csv").open()))
    for split, direct_scores in scores.items():
        logged = [float(r["s_neglabel_plain"]) for r in per_image if r["split"] == split and r["status"] == "scored"]
        torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64), direct_scores, rtol=1e-9, atol=0)
    # lambda 0 of the configured variant (m3 + p_align) is NegLabel* exactly
    assert res["per_lambda"][0]["metrics"] == res["variants"]["neglabel_star"]


def test_results_report_skips_statistics_and_vocabulary(fixture_run, fixture_dirs):
    module, trainer, _ = fixture_run
    res = module.extra_results()["ood"]
    splits = res["splits"]
    assert res["evaluated_partition"] == "test"
    assert splits["id"]["n"] == 6 and splits["id"]["skipped"] == 1  # the corrupt JPEG
    assert splits["ood_placesbg"]["n"] == 4 and splits["ood_placesbg"]["skipped"] == 0
    assert splits["val/id"]["n"] == 3 and splits["val/ood_placesbg"]["n"] == 3  # lambda selection only
    assert splits["calib"]["role"] == "calib" and splits["calib"]["n"] == 2
    corrupt = fixture_datamodule(fixture_dirs).sets("test")[0][2].rows[-1]["img_filename"]
    assert res["skipped_paths"] == {"id": [corrupt]}
    assert "id_accuracy" in splits["id"] and "id_accuracy" not in splits["ood_placesbg"]
    assert res["config"]["n_negatives"] > 0
    assert res["ablation_unavailable"].keys() == {"m2"}
    assert "test/ood/ood_placesbg/negalign/auroc" in trainer.callback_metrics
    assert not any(k.startswith("test/ood/val/") for k in trainer.callback_metrics)
    out = Path(trainer.logger.log_dir)
    roles = list(csv.DictReader((out / "neg_roles.csv").open()))
    assert len(roles) == res["config"]["n_negatives"]
    for role in ("object", "background", "ambiguous"):
        words = (out / f"neg_{role}.txt").read_text().split()
        assert words == [r["word"] for r in roles if r["role"] == role]
    mined = (out / "neg_labels_noun.txt").read_text().split() + (out / "neg_labels_adj.txt").read_text().split()
    assert mined == [r["word"] for r in roles]
    per_image = list(csv.DictReader((out / "test_per_image.csv").open()))
    assert len(per_image) == 2 + 3 + 3 + 6 + 4 + 1
    unreadable = [r for r in per_image if r["status"] == "unreadable"]
    assert [(r["split"], r["path"], r["s_final"]) for r in unreadable] == [("id", corrupt, "")]
    assert set(per_image[0]) >= {"s_neglabel_plain", "s_neglabel_star", "p_align", "s_final", "pred_class", "cam_valid"}
    for name in ("test_lambda_sweep.png", "test_roc.png"):
        assert (out / name).stat().st_size > 1000
    index = json.loads((out / "explanations" / "ood" / "test" / "index.json").read_text())
    # maps of the reported (test) sets only, not of the lambda-selection sets
    assert {i["split"] for i in index["items"]} == {"id", "ood_placesbg"} and len(index["items"]) == 4


def test_lambda_is_chosen_on_validation_and_applied_to_test(fixture_run):
    module, trainer, _ = fixture_run
    res = module.extra_results()["ood"]
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "test_per_image.csv").open()))

    def scores(split, lam):  # the configured variant at any lambda, from the per-image columns
        return torch.tensor(
            [
                float(r["s_neglabel_star"]) + lam * float(r["p_align"])
                for r in rows
                if r["split"] == split and r["status"] == "scored"
            ],
            dtype=torch.float64,
        )

    def auroc(prefix, lam):
        return ood_metrics(scores(f"{prefix}id", lam), scores(f"{prefix}ood_placesbg", lam))["auroc"]

    lambdas = res["lambdas"]
    on_val = [auroc("val/", lam) for lam in lambdas]
    on_test = [auroc("", lam) for lam in lambdas]
    assert res["best_lambda"] == lambdas[max(range(len(lambdas)), key=on_val.__getitem__)]
    assert res["oracle_lambda"] == lambdas[max(range(len(lambdas)), key=on_test.__getitem__)]
    assert res["best_lambda_chosen_on"] == "val"
    chosen = lambdas.index(res["best_lambda"])
    assert res["variants"]["negalign_selected"]["ood_placesbg"]["auroc"] == pytest.approx(on_test[chosen], abs=1e-12)
    assert res["variants"]["negalign_selected"] == res["per_lambda"][chosen]["metrics"]


def test_vocabulary_text_embeddings_are_computed_once(fixture_run, fixture_dirs, tmp_path, small):
    module, _, _ = fixture_run
    encoded = module.texts.encoded
    assert encoded > 500  # the file's first build: ID prompts, ~520 candidate words, role templates
    evaluate(module, fixture_dirs, tmp_path, stage="validate")  # a second pass reuses the run's text side
    assert module.texts.encoded == encoded
    again = NegAlignModule(**small)
    again.build_text_side()  # a new run finds every list in the disk cache
    assert again.texts.encoded == 0
    torch.testing.assert_close(again.terms.scorer.neglabel.neg_emb, module.terms.scorer.neglabel.neg_emb)


def test_saved_negative_labels_are_used_as_they_are(fixture_run, small):
    module, trainer, _ = fixture_run
    again = NegAlignModule(**small, neg_labels_dir=trainer.logger.log_dir)
    again.build_text_side()
    assert again.negatives.words == module.negatives.words
    torch.testing.assert_close(again.terms.scorer.neglabel.neg_emb, module.terms.scorer.neglabel.neg_emb)


# ---- errors --------------------------------------------------------------------------------
def test_empty_vocabulary_is_an_error(tmp_path, small):
    with pytest.raises(ValueError, match="vocabulary is empty"):
        NegAlignModule(**small, nouns=[], adjectives=[]).build_text_side()
    empty = tmp_path / "nouns.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="`nouns`"):
        NegAlignModule(**small, nouns=str(empty)).build_text_side()


def test_id_class_missing_from_prompts_is_an_error(small):
    with pytest.raises(ValueError, match=r"`id_prompts`.*\['circle'\]"):
        NegAlignModule(**small, id_prompts={"square": ["a square"]}).build_text_side()
    with pytest.raises(ValueError, match="`id_prompts`"):
        NegAlignModule(**small, id_prompts=["a photo"]).build_text_side()


def test_unavailable_configured_toggle_is_an_error(small):
    with pytest.raises(ValueError, match="`m2` is on but only"):
        NegAlignModule(**small, m2=True).build_text_side()


# ---- configs and the CLI -------------------------------------------------------------------
def test_waterbirds_config_parses(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--config", str(ROOT / "configs" / "ood_waterbirds.yaml"), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "openclip:ViT-B-16/openai" in printed and "source: waterbirds" in printed


@pytest.fixture(scope="module")
def shapes_cli_run(tmp_path_factory, small):
    save = tmp_path_factory.mktemp("cli")
    main(
        [
            "validate",
            "--config",
            str(ROOT / "configs" / "ood_shapes.yaml"),
            "--trainer.logger.init_args.save_dir",
            str(save),
            "--trainer.enable_progress_bar",
            "false",
            "--model.init_args.text_cache_dir",
            small["text_cache_dir"],
            "--data.init_args.n_id",
            "20",
            "--data.init_args.n_ood",
            "20",
            "--data.init_args.n_calib",
            "20",
            "--data.init_args.batch_size",
            "20",
        ]
    )
    return sorted((save / "ood_shapes").glob("version_*"))[-1]


def test_shapes_config_writes_results_and_tensorboard(shapes_cli_run):
    results = json.loads((shapes_cli_run / "results.json").read_text())
    assert results["backbone"] == "xclip:tiny-shapes"
    metrics, neg = results["metrics"], results["ood"]
    # the logged metrics of each variant, recomputed from the per-image scores it wrote
    rows = list(csv.DictReader((shapes_cli_run / "val_per_image.csv").open()))

    def column(split, name):
        return torch.tensor([float(r[name]) for r in rows if r["split"] == split], dtype=torch.float64)

    for variant, name in (
        ("neglabel", "s_neglabel_plain"),
        ("neglabel_star", "s_neglabel_star"),
        ("negalign", "s_final"),
    ):
        for split in ("ood_background", "ood_novel_shape"):
            expected = ood_metrics(column("id", name), column(split, name))
            for key, value in expected.items():
                assert metrics[f"val/ood/{split}/{variant}/{key}"] == pytest.approx(value, abs=1e-6), (
                    variant,
                    split,
                    key,
                )
    assert [p["lambda"] for p in neg["per_lambda"]] == [0.0, 0.5, 1.0, 2.0, 5.0, 10.0]
    assert {"m1", "m2", "m3", "p_align"} == set(neg["ablation"][0]) - {"name", "metrics", "per_lambda"}
    acc = EventAccumulator(str(shapes_cli_run), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    assert "val/ood/lambda_sweep" in images and "val/ood/roc" in images
    assert sum(t.startswith("val/ood/cam/") for t in images) == 12  # 4 per ID / OOD split


def test_neglabel_auroc_against_background_only_ood_with_the_shipped_checkpoint(small):
    module = NegAlignModule(**small)
    neglabel = module.build_text_side().scorer.neglabel
    bb = module.backbone

    def scores(ood):
        ds = SpuriousShapes(n=200, seed=1000 + (ood is not None), ood=ood)
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])
        with torch.no_grad():
            return neglabel(bb.encode_image(bb.normalize(x)).double())

    auroc = ood_metrics(scores(None), scores("background"))["auroc"]
    assert auroc >= 0.9
