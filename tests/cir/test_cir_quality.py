"""The issue's ShapesWorld criteria on the held-out CIR benchmark, at the docs' sizes (slow: tens
of minutes on 2 CPU cores, SEARLE-OTI included), with the backbone and phi that
configs/cir_shapes.yaml names: SEARLE (phi) and SEARLE-OTI against the baselines on R_subset@1,
R@1 and R@5, and the explanation criteria (B on the modified object, C on the shared one, ``$`` in
D's top 2; margins over a random-init model). Unmet ones are strict xfails carrying the measured
numbers."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from xclip.backbones import load_backbone, wrap_model
from xclip.cir.benchmark import ShapesCIRBenchmark
from xclip.cir.phi import Phi, load_phi
from xclip.cir.quality import collect_maps, random_maps, score_maps
from xclip.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BASELINES = ("image", "text", "image_text")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict[str, dict[str, float]]:
    root = tmp_path_factory.mktemp("cir_table")
    main(
        [
            "test",
            "--config",
            str(ROOT / "configs" / "cir_shapes.yaml"),
            "--trainer.callbacks",
            "[]",
            "--trainer.enable_progress_bar",
            "false",
            "--model.init_args.cache_dir",
            str(root / "cache"),
            "--trainer.logger.init_args.save_dir",
            str(root / "logs"),
        ]
    )
    return json.loads(next((root / "logs").glob("*/version_*/results.json")).read_text())["cir"]["metrics"]


def test_a_caption_blind_method_is_at_chance_on_the_variant_sets(table):
    # image only ranks the six variants of a set the same way for each of its six queries: exactly
    # one of them finds its target first, so R_subset@k is k / 6 by construction
    for k in (1, 2, 3):
        assert table["image"][f"R_subset@{k}"] == pytest.approx(k / 6, abs=1e-9)


def test_searle_beats_the_image_baselines_on_subset_recall_and_oti_wins_global_r1(table):
    for method in ("searle", "searle_oti"):
        for baseline in ("image", "image_text"):
            assert table[method]["R_subset@1"] > table[baseline]["R_subset@1"], (method, baseline)
    for baseline in BASELINES:
        assert table["searle_oti"]["R@1"] > table[baseline]["R@1"], baseline


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured on 600 held-out single-edit queries (+100 CIRCO-style, gallery 1,200): R_subset@1 / R@1 / "
    "R@5: SEARLE (phi) 0.580 / 0.113 / 0.280, SEARLE-OTI 0.580 / 0.252 / 0.495 vs text only 0.612 / 0.042 / "
    "0.178, image only 0.167 / 0.133 / 0.558, image + text 0.388 / 0.223 / 0.572 (docs/workflows/cir.md)",
)
def test_searle_and_oti_beat_every_baseline_on_subset_r1_r1_and_r5(table):
    for method in ("searle", "searle_oti"):
        for baseline in BASELINES:
            for k in ("R_subset@1", "R@1", "R@5"):
                assert table[method][k] > table[baseline][k], (method, baseline, k)


@pytest.fixture(scope="module")
def quality() -> dict[str, dict[str, float]]:
    n = 300
    bench = ShapesCIRBenchmark(n, 1000, 64, "test")  # 50 reference sets x 6 single edits
    queries = list(range(n))
    trained, phi = load_backbone("xclip:tiny-shapes-cir"), load_phi("xclip:searle-phi-tiny-shapes-cir")
    torch.manual_seed(0)
    random_bb = wrap_model(open_clip.model.CLIP(**trained.model_cfg).eval(), preprocess_cfg=trained.preprocess_cfg)
    maps = {
        "trained": collect_maps(trained, phi, bench, queries),
        "random init": collect_maps(random_bb, Phi.for_backbone(random_bb).eval(), bench, queries),
    }
    maps["random map"] = random_maps(maps["trained"])
    return {name: score_maps(bench, queries, m) for name, m in maps.items()}


def test_b_prefers_the_modified_object_and_dollar_ranks_high(quality):
    trained = quality["trained"]
    assert trained["B_on_modified"] > trained["B_on_other_objects"]
    assert trained["B_on_modified"] > quality["random map"]["B_on_modified"]
    assert trained["D_dollar_top2"] > trained["D_chance_top2"] + 0.2
    assert trained["D_dollar_top2"] > quality["random init"]["D_dollar_top2"] + 0.2


def test_b_beats_the_random_init_model_by_0_2(quality):
    assert quality["trained"]["B_on_modified"] - quality["random init"]["B_on_modified"] >= 0.2


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured (n=300 held-out queries, 204 with a shared object): C 0.422 vs random init 0.230 "
    "(+0.191); C's maximum is on the shared object less often than elsewhere (0.422 vs 0.578)",
)
def test_c_beats_the_random_init_model_by_0_2_and_prefers_the_shared_object(quality):
    trained, random_init = quality["trained"], quality["random init"]
    assert trained["C_on_shared"] - random_init["C_on_shared"] >= 0.2
    assert trained["C_on_shared"] > trained["C_elsewhere"]
