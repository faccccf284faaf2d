"""The issue's ShapesWorld criteria on the held-out CIR benchmark, at the README's sizes (slow: tens
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


def test_searle_beats_text_only(table):
    for k in ("R@1", "R@5"):
        assert table["searle"][k] > table["text"][k]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured on 500 held-out triplets: SEARLE (phi) R@1 0.076 / R@5 0.220 vs image only "
    "0.196 / 0.508 and image + text 0.138 / 0.350 (README, model card)",
)
def test_searle_beats_every_baseline_on_r1_and_r5(table):
    for method in BASELINES:
        for k in ("R@1", "R@5"):
            assert table["searle"][k] > table[method][k], (method, k)


@pytest.fixture(scope="module")
def quality() -> dict[str, dict[str, float]]:
    n = 300
    bench = ShapesCIRBenchmark(n, 1000, 64, "test")
    queries = list(range(n))
    trained, phi = load_backbone("xclip:tiny-shapes"), load_phi("xclip:searle-phi-tiny-shapes")
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


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured (n=300): B 0.433 vs random init 0.300 (+0.133), C 0.468 vs 0.275 (+0.194); "
    "C's maximum is on the shared object less often than elsewhere (0.468 vs 0.532)",
)
def test_b_and_c_beat_the_random_init_model_by_0_2_and_c_prefers_the_shared_object(quality):
    trained, random_init = quality["trained"], quality["random init"]
    assert trained["B_on_modified"] - random_init["B_on_modified"] >= 0.2
    assert trained["C_on_shared"] - random_init["C_on_shared"] >= 0.2
    assert trained["C_on_shared"] > trained["C_elsewhere"]
