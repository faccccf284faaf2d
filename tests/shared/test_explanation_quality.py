"""Explanation quality on ShapesWorld with the shipped checkpoint, in the relative form the project
settled on: a map must follow the text (point at the object the text names rather than the other
one) by a margin, and by a margin more than the same explainer on a random-init model of the same
architecture. Single-object pointing is reported in docs/explanations.md, not floored: on an 8x8 grid it
measures the tiny checkpoint more than the explainer."""

import open_clip
import pytest
import torch

from xclip.backbones import load_backbone, wrap_model
from xclip.explain import GAME, GradECLIP, RandomMap
from xclip.explain.quality import auc, deletion_insertion_curves, pointing_game, pointing_on, randomize_top_blocks
from xclip.explain.shapes_eval import cosine_score_fn, evaluate_explainer, paired_maps, probe_set, sanity_correlation

N_SINGLE = 150
N_TWO = 300  # the n of the table in docs/explanations.md
EXPLAINERS = {
    "grad_eclip": lambda bb: GradECLIP(bb),
    "grad_eclip_reference": lambda bb: GradECLIP(bb, mode="reference"),
    "game": lambda bb: GAME(bb),
}


@pytest.fixture(scope="module")
def setup():
    trained = load_backbone("xclip:tiny-shapes")
    torch.manual_seed(0)
    random_init = wrap_model(open_clip.model.CLIP(**trained.model_cfg).eval(), preprocess_cfg=trained.preprocess_cfg)
    return trained, random_init, probe_set(N_SINGLE, 1), probe_set(N_TWO, 2)


def named_minus_other(explainer, backbone, double) -> tuple[float, float]:
    maps = paired_maps(explainer, backbone, double.images, double.texts)
    named = pointing_on(maps, double.named_masks).float().mean().item()
    other = pointing_on(maps, double.other_masks).float().mean().item()
    return named, other


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_the_map_follows_the_text(setup, name):
    """Two-object probes (exact pointing game, n = 300): the map's maximum lands on the named
    object at least 0.30 more often than on the other one, and that difference beats the same
    explainer on the random-init model by at least 0.25 (docs/explanations.md: 0.39 / 0.40 / 0.37 trained,
    about -0.07 random init)."""
    trained, random_init, _, double = setup
    named, other = named_minus_other(EXPLAINERS[name](trained), trained, double)
    r_named, r_other = named_minus_other(EXPLAINERS[name](random_init), random_init, double)
    assert named - other >= 0.30, (named, other)
    assert (named - other) - (r_named - r_other) >= 0.25, ((named, other), (r_named, r_other))


def test_gradeclip_ranks_patches_better_than_a_random_map(setup):
    """Deletion / insertion (blur, 8 steps): insertion AUC exceeds deletion AUC by at least 0.01
    for Grad-ECLIP (measured 0.022) and by at least 0.01 more than for random maps, whose gap
    scatters around zero (-0.003 .. +0.005 over 9 seeds)."""
    trained, _, single, _ = setup
    score = cosine_score_fn(trained, single.texts)

    def gap(explainer) -> float:
        maps = paired_maps(explainer, trained, single.images, single.texts)
        d, i = (
            auc(deletion_insertion_curves(score, single.images, maps, steps=8, mode=m, fill="blur")).mean().item()
            for m in ("deletion", "insertion")
        )
        return i - d

    ours = gap(GradECLIP(trained))
    randoms = [gap(RandomMap(trained, seed=s)) for s in range(2)]
    assert ours >= 0.01, ours
    assert ours >= max(randoms) + 0.01, (ours, randoms)


def test_model_randomisation_sanity_check(setup):
    trained, _, single, _ = setup
    blocks = list(trained.model.visual.transformer.resblocks)[-2:]
    randomised = wrap_model(
        randomize_top_blocks(trained.model, blocks, seed=0).eval(), preprocess_cfg=trained.preprocess_cfg
    )
    images, texts = single.images[:60], single.texts[:60]
    rho = sanity_correlation(
        paired_maps(GradECLIP(trained), trained, images, texts),
        paired_maps(GradECLIP(randomised), randomised, images, texts),
    )
    assert rho < 0.5, rho


def test_evaluate_explainer_reports_tolerant_pointing_next_to_the_exact_game(setup):
    trained, _, single, double = setup
    single, double = probe_set(40, 1), probe_set(40, 2)
    row = evaluate_explainer(GAME(trained), single, double, steps=2, tolerances=(2, 6))
    maps1 = paired_maps(GAME(trained), trained, single.images, single.texts)
    maps2 = paired_maps(GAME(trained), trained, double.images, double.texts)
    for t in (2, 6):
        assert row[f"pointing_single_t{t}"] == pointing_game(maps1, single.named_masks, tolerance=t).accuracy
        assert (
            row[f"pointing_named_two_t{t}"] == pointing_on(maps2, double.named_masks, tolerance=t).float().mean().item()
        )
        assert (
            row[f"pointing_other_two_t{t}"] == pointing_on(maps2, double.other_masks, tolerance=t).float().mean().item()
        )
    # a wider margin can only turn misses into hits, and at 6 px it does for some probes
    for key in ("pointing_single", "pointing_named_two", "pointing_other_two"):
        assert row[key] <= row[f"{key}_t2"] <= row[f"{key}_t6"]
    assert row["pointing_single_t6"] > row["pointing_single"]
    assert "pointing_single_t4" not in row


@pytest.fixture(scope="module")
def siglip_setup():
    """The shipped SigLIP-style model (timm `map` head: a learned latent query, no class token) and
    its random-init twin."""
    trained = load_backbone("xclip:tiny-shapes-siglip")
    torch.manual_seed(0)
    random_init = wrap_model(open_clip.model.CLIP(**trained.model_cfg).eval(), preprocess_cfg=trained.preprocess_cfg)
    return trained, random_init, probe_set(N_TWO, 2)


@pytest.mark.parametrize("name", ["grad_eclip", "game"])
def test_the_map_points_at_the_named_object_on_the_siglip_style_model(siglip_setup, name):
    """What holds on the latent query's attention pool (card: Grad-ECLIP 0.187 / 0.023, GAME
    0.237 / 0.033; random-init twin 0.177 / 0.223 and 0.243 / 0.237): the map's maximum lands on
    the named object clearly more often than on the other one, and more so than on the twin."""
    trained, random_init, double = siglip_setup
    named, other = named_minus_other(EXPLAINERS[name](trained), trained, double)
    r_named, r_other = named_minus_other(EXPLAINERS[name](random_init), random_init, double)
    assert named - other >= 0.10, (named, other)
    assert (named - other) - (r_named - r_other) >= 0.15, ((named, other), (r_named, r_other))


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured (n=300, checkpoints/tiny-shapes-siglip/README.md): Grad-ECLIP named / other 0.187 / 0.023 "
    "(difference 0.163, +0.210 over the random-init twin), GAME 0.237 / 0.033 (0.203, +0.197)",
)
@pytest.mark.parametrize("name", ["grad_eclip", "game"])
def test_the_map_follows_the_text_on_the_siglip_style_model(siglip_setup, name):
    """The CLIP-style model's criterion on a non-class-token pooling head: Grad-ECLIP's and GAME's
    maps on the latent query's attention pool."""
    trained, random_init, double = siglip_setup
    named, other = named_minus_other(EXPLAINERS[name](trained), trained, double)
    r_named, r_other = named_minus_other(EXPLAINERS[name](random_init), random_init, double)
    assert named - other >= 0.30, (named, other)
    assert (named - other) - (r_named - r_other) >= 0.25, ((named, other), (r_named, r_other))
