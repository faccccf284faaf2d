"""Measured explanation quality on ShapesWorld, where every object's pixels are known.

Probe sets:
- single-object: one object, the text names it (``"a red circle"``); pointing game, energy
  pointing game, deletion/insertion AUC of the model's cosine.
- two-object: two objects with different (colour, shape), the text names one; the map's maximum
  should lie on the named object and not on the other.
Plus the model-randomisation sanity check (maps must change when the top blocks are re-initialised)
and a region profile (`region_profile`): where a map, or one factor of it, puts its weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone
from xclip.data.shapes import image_tensor, render, sample_rng, sample_scene
from xclip.data.shapes.scene import Scene
from xclip.explain.base import Explainer
from xclip.explain.quality import (
    auc,
    deletion_insertion_curves,
    energy_pointing_mean,
    pointing_game,
    pointing_on,
    spearman_rank_correlation,
)


@dataclass
class ProbeSet:
    """Images [N,3,S,S] in [0,1], one text per image, the named object's mask [N,S,S] and, for
    two-object sets, the other object's mask."""

    images: Tensor
    texts: list[str]
    named_masks: Tensor
    other_masks: Tensor | None = None


def _probe(scene: Scene, size: int, rng: np.random.Generator, named: int) -> tuple[Tensor, str, Tensor, Tensor]:
    image, instances = render(scene, size, rng)
    obj = scene.objects[named]
    masks = torch.from_numpy(instances[None] == np.arange(1, len(scene.objects) + 1, dtype=np.int8)[:, None, None])
    other = masks[1 - named] if len(scene.objects) == 2 else torch.zeros_like(masks[0])
    return image_tensor(image), f"a {obj.colour} {obj.shape}", masks[named], other


def probe_set(n: int, n_objects: int, seed: int = 3000, size: int = 64) -> ProbeSet:
    """`n` deterministic probes with 1 or 2 objects (two-object scenes have distinct nouns)."""
    if n_objects not in (1, 2):
        raise ValueError("probe sets have 1 or 2 objects")
    items: list[tuple[Tensor, str, Tensor, Tensor]] = []
    index = 0
    while len(items) < n:
        rng = sample_rng(seed + n_objects, "classification", index)
        index += 1
        scene = sample_scene(rng, n_objects=n_objects)
        if n_objects == 2 and scene.objects[0].noun == scene.objects[1].noun:
            continue
        items.append(_probe(scene, size, rng, named=int(rng.integers(n_objects))))
    images, texts, named, other = zip(*items)
    return ProbeSet(
        torch.stack(images), list(texts), torch.stack(named), torch.stack(other) if n_objects == 2 else None
    )


def paired_maps(
    explainer: Explainer, backbone: Backbone, images01: Tensor, texts: list[str], batch_size: int = 64
) -> Tensor:
    """Map of image i for text i: [N, gh, gw] (batched; the K texts of a batch are its own texts)."""
    out = []
    for s in range(0, len(texts), batch_size):
        x = backbone.normalize(images01[s : s + batch_size].to(backbone.device))
        out.append(explainer.pair_maps(x, texts[s : s + batch_size]).detach().cpu())
    return torch.cat(out)


def cosine_score_fn(backbone: Backbone, texts: list[str]):
    """score_fn for deletion/insertion: each image's cosine with its own text (inputs in [0,1])."""
    with torch.no_grad():
        text_emb = backbone.encode_text(texts, normalize=True)

    @torch.no_grad()
    def score(images01: Tensor) -> Tensor:
        emb = backbone.encode_image(backbone.normalize(images01.to(backbone.device)), normalize=True)
        return (emb * text_emb[: emb.shape[0]]).sum(-1).cpu()

    return score


def evaluate_explainer(
    explainer: Explainer, single: ProbeSet, double: ProbeSet, steps: int = 16, tolerances: Sequence[int] = ()
) -> dict[str, float]:
    """Pointing game (single), named/other pointing (two-object), all-zero rate, energy pointing
    game and deletion/insertion AUC (blur fill, patch level, normalised by the number of steps).

    The pointing keys are exact; for every t in `tolerances` the same three are added with a
    margin of t pixels (``pointing_single_t4`` ...; see `quality.pointing_game`).
    """
    other_masks = double.other_masks
    if other_masks is None:
        raise ValueError(
            "evaluate_explainer: `double` must be a two-object probe set (probe_set(n, 2)), the one with other_masks"
        )
    bb = explainer.backbone
    maps1 = paired_maps(explainer, bb, single.images, single.texts)
    pg = pointing_game(maps1, single.named_masks)
    maps2 = paired_maps(explainer, bb, double.images, double.texts)
    constant2 = (maps2.flatten(1).amax(1) - maps2.flatten(1).amin(1)) <= 0
    score = cosine_score_fn(bb, single.texts)
    deletion = deletion_insertion_curves(score, single.images, maps1, steps=steps, mode="deletion", fill="blur")
    insertion = deletion_insertion_curves(score, single.images, maps1, steps=steps, mode="insertion", fill="blur")
    row = {
        "pointing_single": pg.accuracy,
        "all_zero_rate_single": pg.all_zero_rate,
        "energy_pointing_single": energy_pointing_mean(maps1, single.named_masks),
        "pointing_named_two": pointing_on(maps2, double.named_masks).float().mean().item(),
        "pointing_other_two": pointing_on(maps2, other_masks).float().mean().item(),
        "all_zero_rate_two": constant2.float().mean().item(),
        "deletion_auc": auc(deletion).mean().item(),
        "insertion_auc": auc(insertion).mean().item(),
    }
    for t in tolerances:
        row[f"pointing_single_t{t}"] = pointing_game(maps1, single.named_masks, tolerance=t).accuracy
        row[f"pointing_named_two_t{t}"] = pointing_on(maps2, double.named_masks, tolerance=t).float().mean().item()
        row[f"pointing_other_two_t{t}"] = pointing_on(maps2, other_masks, tolerance=t).float().mean().item()
    return row


def sanity_correlation(maps_trained: Tensor, maps_randomised: Tensor) -> float:
    """Mean Spearman rank correlation between two map sets [N, gh, gw], ignoring constant maps."""
    rho = spearman_rank_correlation(maps_trained.flatten(1).double(), maps_randomised.flatten(1).double())
    rho = rho[torch.isfinite(rho)]
    return rho.mean().item() if rho.numel() else float("nan")


REGIONS = ("named inside", "named edge", "other inside", "other edge", "background")


def patch_regions(named_masks: Tensor, other_masks: Tensor | None, grid: tuple[int, int]) -> Tensor:
    """Which of `REGIONS` every patch belongs to: [N, gh, gw] long.

    A patch belongs to the object covering more of it; "inside" when that object covers at least
    half of the patch, "edge" when less; "background" when no object pixel falls in it.
    """
    named = F.adaptive_avg_pool2d(named_masks.float()[:, None], grid)[:, 0]
    other = (
        torch.zeros_like(named)
        if other_masks is None
        else F.adaptive_avg_pool2d(other_masks.float()[:, None], grid)[:, 0]
    )
    cover = torch.maximum(named, other)
    region = torch.where(named >= other, 0, 2) + (cover < 0.5).long()
    return region.masked_fill(cover == 0, REGIONS.index("background"))


def region_profile(
    values: Tensor, named_masks: Tensor, other_masks: Tensor | None = None
) -> dict[str, dict[str, float]]:
    """Where a patch-grid quantity [N, gh, gw] (a map, or one factor of one) puts its weight.

    ``"mean z"``: per region, the mean of the values standardised within each image (images with
    constant values are skipped); ``"argmax share"``: the share of all images whose maximum patch
    lies in each region (a constant map has no maximum and counts in no region, as in the pointing
    game). NaN for a region no patch belongs to.
    """
    regions = patch_regions(named_masks, other_masks, (values.shape[-2], values.shape[-1])).flatten(1)
    flat = values.detach().double().flatten(1)
    std = flat.std(1, keepdim=True)
    keep = (std > 0)[:, 0]
    z = ((flat - flat.mean(1, keepdim=True)) / std.clamp_min(torch.finfo(flat.dtype).tiny))[keep]
    at_max = regions.gather(1, flat.argmax(1, keepdim=True))[:, 0].masked_fill(~keep, -1)
    profile: dict[str, dict[str, float]] = {"mean z": {}, "argmax share": {}}
    for index, name in enumerate(REGIONS):
        members = regions[keep] == index
        profile["mean z"][name] = z[members].mean().item() if members.any() else float("nan")
        profile["argmax share"][name] = (at_max == index).double().mean().item()
    return profile
