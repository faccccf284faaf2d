"""Explanation quality on ShapesWorld for every explainer, on the shipped checkpoint and on a
random-init model of the same architecture (objects are high-contrast, so even a random model
points at them often: the table shows how much of a score the training earned).

    python scripts/eval_explanations.py --out outputs/explanation_quality
    python scripts/eval_explanations.py --checkpoint xclip:tiny-shapes-siglip --out outputs/explanation_quality_siglip

Explainers a family refuses (Grad-ECLIP's reference mode outside OpenAI-style ViTs) are left out.

Writes `<out>.json` and `<out>.md` (the table in docs/explanations.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch

from xclip.backbones import Backbone, UnsupportedFamily, load_backbone, wrap_model
from xclip.explain import GAME, GradCAM, GradECLIP, RandomMap
from xclip.explain.gradeclip import combine_terms
from xclip.explain.quality import randomize_top_blocks
from xclip.explain.shapes_eval import (
    REGIONS,
    ProbeSet,
    evaluate_explainer,
    paired_maps,
    probe_set,
    region_profile,
    sanity_correlation,
)
from xclip.io import atomic_write_text

EXPLAINERS = {
    "Grad-ECLIP": lambda bb: GradECLIP(bb),
    "Grad-ECLIP (reference mode)": lambda bb: GradECLIP(bb, mode="reference"),
    "Grad-CAM (ln_1)": lambda bb: GradCAM(bb),
    "GAME (last block)": lambda bb: GAME(bb),
    "random map": lambda bb: RandomMap(bb, seed=0),
}
COLUMNS = [
    ("pointing_single", "PG 1-obj"),
    ("pointing_named_two", "named 2-obj"),
    ("pointing_other_two", "other 2-obj"),
    ("all_zero_rate_single", "all-zero"),
    ("energy_pointing_single", "energy PG"),
    ("deletion_auc", "deletion AUC (lower better)"),
    ("insertion_auc", "insertion AUC"),
    ("sanity_spearman", "sanity rho"),
]


def random_twin(backbone: Backbone, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return wrap_model(open_clip.model.CLIP(**backbone.model_cfg).eval(), preprocess_cfg=backbone.preprocess_cfg)


def vision_block_modules(backbone: Backbone) -> list[torch.nn.Module]:
    """The image tower's transformer blocks: open_clip's ViT or a timm trunk's."""
    visual = backbone.model.visual
    return list(visual.trunk.blocks) if hasattr(visual, "trunk") else list(visual.transformer.resblocks)


def top_blocks_randomised(backbone: Backbone, n_blocks: int) -> Backbone:
    """Adebayo et al.'s model randomisation: the top `n_blocks` vision blocks re-initialised."""
    blocks = vision_block_modules(backbone)[-n_blocks:]
    return wrap_model(
        randomize_top_blocks(backbone.model, blocks, seed=0).eval(), preprocess_cfg=backbone.preprocess_cfg
    )


def evaluate_all(
    spec: str, n: int, sanity_blocks: int, tolerances: list[int]
) -> dict[str, dict[str, dict[str, float]]]:
    trained = load_backbone(spec)
    single, double = probe_set(n, 1), probe_set(n, 2)
    randomised = top_blocks_randomised(trained, sanity_blocks)
    results: dict[str, dict[str, dict[str, float]]] = {"trained": {}, "random init": {}}
    for name, make in EXPLAINERS.items():
        try:
            make(trained).image_maps(trained.normalize(single.images[:1]), single.texts[:1])
        except UnsupportedFamily as err:
            print(f"skipping {name}: {err}", flush=True)
            continue
        print(f"evaluating {name} ...", flush=True)
        row = evaluate_explainer(make(trained), single, double, tolerances=tolerances)
        maps_trained = paired_maps(make(trained), trained, single.images, single.texts)
        row["sanity_spearman"] = sanity_correlation(
            maps_trained, paired_maps(make(randomised), randomised, single.images, single.texts)
        )
        results["trained"][name] = row
        results["random init"][name] = evaluate_explainer(
            make(random_twin(trained)), single, double, tolerances=tolerances
        )
    return results


def factor_profiles(backbone: Backbone, probes: ProbeSet, batch_size: int = 64) -> dict[str, dict]:
    """Region profiles of Grad-ECLIP's map, of its two factors (spatial lambda averaged over heads,
    channel g.v summed over heads) and of GAME's map, each image with its own text."""
    explainer = GradECLIP(backbone)
    spatial, channel, maps = [], [], []
    for s in range(0, len(probes.texts), batch_size):
        x = backbone.normalize(probes.images[s : s + batch_size].to(backbone.device))
        terms = explainer.terms(x, probes.texts[s : s + batch_size], pairs=True)
        spatial.append(terms.spatial.mean(1).cpu())
        channel.append(terms.channel[:, 0].sum(1).cpu())
        maps.append(combine_terms(terms.spatial, terms.channel)[:, 0].cpu())
    values = {
        "Grad-ECLIP map": torch.cat(maps),
        "spatial factor (lambda)": torch.cat(spatial),
        "channel factor (g.v)": torch.cat(channel),
        "GAME map": paired_maps(GAME(backbone), backbone, probes.images, probes.texts),
    }
    return {name: region_profile(v, probes.named_masks, probes.other_masks) for name, v in values.items()}


def profile_markdown(profiles: dict[str, dict]) -> str:
    lines = [
        "Two-object probes, trained checkpoint: mean per-image z-score of each quantity by patch region "
        "(inside: the object covers >= half of the patch; edge: less), then where its maximum falls.",
        "",
        "| quantity | "
        + " | ".join(f"z {r}" for r in REGIONS)
        + " | "
        + " | ".join(f"max on {r}" for r in REGIONS)
        + " |",
        "|---|" + "---|" * (2 * len(REGIONS)),
    ]
    for name, p in profiles.items():
        cells = [f"{p['mean z'][r]:+.2f}" for r in REGIONS] + [f"{p['argmax share'][r]:.2f}" for r in REGIONS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(results: dict, n: int, sanity_blocks: int) -> str:
    lines = [
        f"ShapesWorld, 64 px, {n} single-object and {n} two-object probes (seed 3000); "
        f"sanity: top {sanity_blocks} vision blocks re-initialised.",
        "",
    ]
    lines.append("| model | explainer | " + " | ".join(c for _, c in COLUMNS) + " |")
    lines.append("|---|---|" + "---|" * len(COLUMNS))
    for model, rows in results.items():
        for name, row in rows.items():
            cells = [f"{row[k]:.3f}" if k in row and row[k] == row[k] else "-" for k, _ in COLUMNS]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tolerance_markdown(results: dict, tolerances: list[int]) -> str:
    """Pointing single / named / other at each margin (t = 0 is the main table's exact game)."""
    keys = ("pointing_single", "pointing_named_two", "pointing_other_two")
    lines = [
        "Pointing game single / named / other with a margin of t px (a hit when a mask pixel is "
        "< t px from the map's maximum, as Zhang et al. / TorchRay; t = 0: exact).",
        "",
        "| model | explainer | t = 0 | " + " | ".join(f"t = {t} px" for t in tolerances) + " |",
        "|---|---|---|" + "---|" * len(tolerances),
    ]
    for model, rows in results.items():
        for name, row in rows.items():
            cells = [
                " / ".join(f"{row[k + suffix]:.2f}" for k in keys) for suffix in [""] + [f"_t{t}" for t in tolerances]
            ]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="xclip:tiny-shapes")
    parser.add_argument("--n", type=int, default=300, help="probes per set")
    parser.add_argument("--sanity-blocks", type=int, default=2)
    parser.add_argument(
        "--tolerances",
        type=int,
        nargs="*",
        default=[2, 4],
        help="pointing-game margins (px) reported next to the exact game",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/explanation_quality"))
    args = parser.parse_args()
    results = evaluate_all(args.checkpoint, args.n, args.sanity_blocks, args.tolerances)
    profiles = factor_profiles(load_backbone(args.checkpoint), probe_set(args.n, 2))
    table = "\n".join(
        [
            markdown(results, args.n, args.sanity_blocks),
            tolerance_markdown(results, args.tolerances),
            profile_markdown(profiles),
        ]
    )
    print(table)
    atomic_write_text(
        args.out.with_suffix(".json"),
        json.dumps(
            {"checkpoint": args.checkpoint, "n": args.n, "results": results, "region_profiles": profiles}, indent=2
        ),
    )
    atomic_write_text(args.out.with_suffix(".md"), table)
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
