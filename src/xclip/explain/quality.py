"""Quality metrics for patch-grid explanation maps.

All functions are plain, batched torch code. They accept CPU or GPU tensors (numpy arrays are
converted with :func:`torch.as_tensor`) and never loop over images in Python except where noted.

Conventions
-----------
* ``maps``: raw, non-negative patch-grid maps, shape ``[N, gh, gw]`` (some functions also take
  extra leading dimensions, e.g. ``[N, K, gh, gw]``, see each docstring). A map may be entirely
  zero (Grad-ECLIP's ReLU can produce that); such maps never count as a pointing-game hit.
* ``masks``: boolean object masks at image resolution, shape ``[N, H, W]``.
* ``images``: float ``[N, 3, H, W]`` with ``H = gh * patch`` (other sizes work: maps are
  resized to the image).

Metrics:

* pointing game (Zhang et al. 2018), with empty masks *skipped* (Quantus scores them as hits
  because a NaN assigned into a bool array becomes True);
* energy (mass-based) pointing game;
* deletion / insertion curves and their AUC, normalised by the number of steps (Quantus'
  ``get_auc_score`` is *not* normalised: it is the raw trapezoid area over unit-spaced x);
* model-randomisation sanity check (Adebayo et al. 2018) with a tie-aware Spearman correlation;
* (the uniform random baseline maps are `xclip.explain.random_map.random_values`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PointingResult",
    "upsample_maps",
    "pointing_game",
    "pointing_on",
    "energy_pointing_game",
    "energy_pointing_mean",
    "nan_mean",
    "gaussian_blur",
    "deletion_insertion_curves",
    "auc",
    "spearman_rank_correlation",
    "randomize_top_blocks",
    "model_randomisation_check",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_float(x: Tensor | object) -> Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.float()
    return t


def _as_bool(x: Tensor | object) -> Tensor:
    t = torch.as_tensor(x)
    return t if t.dtype == torch.bool else t != 0


def nan_mean(x: Tensor) -> float:
    """Mean of the non-NaN entries of ``x`` as a Python float; NaN when there are none."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    keep = ~torch.isnan(x)
    if not bool(keep.any()):
        return math.nan
    return float(x[keep].mean())


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize patch-grid maps to image resolution (``align_corners=False``).

    Args:
        maps: ``[..., gh, gw]`` (typically ``[N, gh, gw]``); integer maps are cast to float32.
        size: target ``(H, W)``.

    Returns:
        ``[..., H, W]``, same floating dtype and device as ``maps``. Bilinear weights are convex, so
        a non-negative map stays non-negative and its maximum is not exceeded.
    """
    maps = _as_float(maps)
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 dims [..., gh, gw], got {tuple(maps.shape)}")
    lead, (gh, gw) = maps.shape[:-2], maps.shape[-2:]
    H, W = int(size[0]), int(size[1])
    flat = maps.reshape(-1, 1, gh, gw)
    if flat.shape[0] == 0:
        return flat.new_zeros(*lead, H, W)
    out = F.interpolate(flat, size=(H, W), mode="bilinear", align_corners=False)
    return out.reshape(*lead, H, W)


# --------------------------------------------------------------------------------------------
# pointing game
# --------------------------------------------------------------------------------------------
@dataclass
class PointingResult:
    """Outcome of :func:`pointing_game` for ``N`` (map, mask) pairs.

    Attributes:
        hits: ``[N]`` bool. True iff the mask is non-empty, the map is not constant, and the
            argmax pixel of the upsampled map lies in the (dilated) mask.
        valid: ``[N]`` bool. True iff the mask is non-empty (only these are scored).
        all_zero: ``[N]`` bool. True iff the map is all zero or constant (no maximum to point with);
            always a miss. Reported for every image, valid or not.
        accuracy: hits / valid count; NaN when no image is valid.
        n_skipped: number of images with an empty mask (not scored, never a hit).
        all_zero_rate: share of *valid* images whose map is constant; NaN when none is valid.
    """

    hits: Tensor
    valid: Tensor
    all_zero: Tensor
    accuracy: float
    n_skipped: int
    all_zero_rate: float


def _mask_near(masks: Tensor, idx: Tensor, tolerance: int) -> Tensor:
    """Whether each ``[M, H, W]`` mask has a pixel at Euclidean distance < ``tolerance`` from its
    point ``idx`` [M] (row-major pixel index); ``tolerance`` 0 means the point itself.

    This is the acceptance disk of TorchRay's pointing game (Zhang et al.'s 15 px margin); only the
    disk around each point is read, so large masks and margins stay cheap.
    """
    H, W = masks.shape[-2:]
    y, x = idx // W, idx % W
    r = max(int(tolerance) - 1, 0)
    dy, dx = torch.meshgrid(
        torch.arange(-r, r + 1, device=masks.device), torch.arange(-r, r + 1, device=masks.device), indexing="ij"
    )
    disk = (dy**2 + dx**2 < max(int(tolerance), 1) ** 2).flatten()
    dy, dx = dy.flatten()[disk], dx.flatten()[disk]  # [P] offsets
    yy, xx = y[:, None] + dy, x[:, None] + dx  # [M, P]
    inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    flat = yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)
    return (masks.flatten(1).gather(1, flat) & inside).any(dim=1)


def _maps_and_masks(maps, masks) -> tuple[Tensor, Tensor]:
    """Float maps [..., gh, gw] and bool masks [..., H, W] on the maps' device, leading dims checked."""
    maps = _as_float(maps)
    masks = _as_bool(masks).to(maps.device)
    if maps.ndim < 3 or masks.ndim != maps.ndim or masks.shape[:-2] != maps.shape[:-2]:
        raise ValueError(
            f"maps [..., gh, gw] and masks [..., H, W] need the same leading dims, got "
            f"{tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    return maps, masks


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> PointingResult:
    """Pointing game (Zhang et al. 2018) on patch-grid maps.

    For each pair, the map is upsampled bilinearly to the mask's ``(H, W)``; its argmax pixel
    (first in row-major order on ties) is a hit when it lies inside the mask or, with
    ``tolerance > 0``, when a mask pixel lies at Euclidean distance < ``tolerance`` from it (the
    acceptance disk of Zhang et al. / TorchRay, whose default margin is 15 px).

    * A constant map (in particular an all-zero one) has no maximum: it is a miss and is flagged in
      ``all_zero``. Non-finite values are treated as 0 when locating the maximum.
    * An empty mask is skipped (``valid`` False, counted in ``n_skipped``) and never a hit.

    Args:
        maps: ``[N, gh, gw]``; extra leading dims are allowed (``[N, K, gh, gw]``) as long as
            ``masks`` has the same leading dims (``[N, K, H, W]``).
        masks: ``[N, H, W]`` bool (non-bool is compared with 0), on any device.
        tolerance: margin in pixels (0: exact mask).

    Returns:
        :class:`PointingResult`; its tensors have the leading shape of ``maps`` and live on the
        device of ``maps``.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance is a margin in pixels (>= 0), got {tolerance}")
    maps, masks = _maps_and_masks(maps, masks)
    lead = maps.shape[:-2]
    H, W = masks.shape[-2:]
    flat_maps = torch.nan_to_num(maps.reshape(-1, *maps.shape[-2:]), nan=0.0, posinf=0.0, neginf=0.0)
    flat_masks = masks.reshape(-1, H, W)
    n = flat_maps.shape[0]

    valid = flat_masks.flatten(1).any(dim=1) if n else torch.zeros(0, dtype=torch.bool, device=maps.device)
    # constant check on the raw grid: a bilinear upsample of a constant can pick up rounding noise
    raw = flat_maps.flatten(1)
    all_zero = (raw.amax(dim=1) <= raw.amin(dim=1)) if n else valid.clone()

    up = upsample_maps(flat_maps, (H, W)).flatten(1)
    idx = up.argmax(dim=1) if n else torch.zeros(0, dtype=torch.long, device=maps.device)
    at_max = _mask_near(flat_masks, idx, tolerance) if n else valid.clone()
    hits = at_max & valid & ~all_zero

    n_valid = int(valid.sum())
    accuracy = float(hits.sum()) / n_valid if n_valid else math.nan
    all_zero_rate = float((all_zero & valid).sum()) / n_valid if n_valid else math.nan
    return PointingResult(
        hits=hits.reshape(lead),
        valid=valid.reshape(lead),
        all_zero=all_zero.reshape(lead),
        accuracy=accuracy,
        n_skipped=n - n_valid,
        all_zero_rate=all_zero_rate,
    )


def pointing_on(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Per-image "the map's maximum lies in this mask" (``[N]`` bool, same rules as
    :func:`pointing_game`: constant maps and empty masks give False).

    Two-object test: ``pointing_on(maps, named_masks)`` and ``pointing_on(maps, other_masks)``
    are one call each; with disjoint masks at most one of the two is True per image.
    """
    return pointing_game(maps, masks, tolerance).hits


# --------------------------------------------------------------------------------------------
# energy pointing game
# --------------------------------------------------------------------------------------------
def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy (mass-based) pointing game: share of positive attribution inside the mask.

    ``score = sum(relu(up) * mask) / sum(relu(up))`` with ``up`` the bilinearly upsampled map.

    Args:
        maps: ``[N, gh, gw]`` (or ``[..., gh, gw]`` with ``masks`` ``[..., H, W]``).
        masks: ``[N, H, W]`` bool.

    Returns:
        ``[N]`` float (dtype of the maps, at least float32) in ``[0, 1]``; NaN where the map has
        no positive mass (all zero) or the mask is empty. Use :func:`nan_mean` (or
        :func:`energy_pointing_mean`) to average.
    """
    maps, masks = _maps_and_masks(maps, masks)
    up = upsample_maps(maps, (masks.shape[-2], masks.shape[-1])).clamp(min=0).flatten(-2)
    m = masks.flatten(-2)
    total = up.sum(-1)
    inside = (up * m).sum(-1)
    score = inside / total
    bad = (total <= 0) | ~m.any(-1) | ~torch.isfinite(total)
    return torch.where(bad, torch.full_like(score, math.nan), score)


def energy_pointing_mean(maps: Tensor, masks: Tensor) -> float:
    """Mean of :func:`energy_pointing_game` over the images where it is defined (NaN ignored)."""
    return nan_mean(energy_pointing_game(maps, masks))


# --------------------------------------------------------------------------------------------
# deletion / insertion
# --------------------------------------------------------------------------------------------
def gaussian_blur(images: Tensor, kernel_size: int | None = None, sigma: float | None = None) -> Tensor:
    """Separable gaussian blur of ``[N, C, H, W]`` images with replicate padding (pure conv2d).

    Defaults: ``kernel_size`` = the odd integer nearest ``max(H, W) / 8`` (at least 3),
    ``sigma = kernel_size / 4``. A constant image stays constant.
    """
    images = _as_float(images)
    N, C, H, W = images.shape
    if kernel_size is None:
        kernel_size = max(3, 2 * int(round(max(H, W) / 16)) + 1)
    kernel_size = int(kernel_size)
    if kernel_size % 2 == 0:
        kernel_size += 1
    if sigma is None:
        sigma = kernel_size / 4.0
    r = kernel_size // 2
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    g = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    g = g / g.sum()
    kx = g.view(1, 1, 1, -1).expand(C, 1, 1, kernel_size).contiguous()
    ky = g.view(1, 1, -1, 1).expand(C, 1, kernel_size, 1).contiguous()
    out = F.conv2d(F.pad(images, (r, r, 0, 0), mode="replicate"), kx, groups=C)
    out = F.pad(out, (0, 0, r, r), mode="replicate")
    return F.conv2d(out, ky, groups=C)


def _fill_images(
    images: Tensor,
    fill: str | Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    if isinstance(fill, Tensor):
        return fill.to(device=images.device, dtype=images.dtype).expand_as(images)
    if fill == "blur":
        return gaussian_blur(images)
    if fill == "black":
        return torch.zeros_like(images)
    if fill == "noise":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.rand(images.shape, generator=generator, device=gen_device, dtype=torch.float32)
        return noise.to(device=images.device, dtype=images.dtype)
    raise ValueError(f"fill must be 'noise', 'blur', 'black' or a tensor, got {fill!r}")


def _importance_rank(values: Tensor) -> Tensor:
    """``[N, P]`` values -> ``[N, P]`` rank (0 = most important); ties keep index order."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))
    return ranks


def _cells_to_pixels(cell_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, gh, gw]`` float -> ``[N, 1, H, W]`` (block copy; nearest when not divisible)."""
    N, gh, gw = cell_mask.shape
    H, W = size
    if H % gh == 0 and W % gw == 0:
        out = cell_mask.repeat_interleave(H // gh, dim=1).repeat_interleave(W // gw, dim=2)
        return out.unsqueeze(1)
    return F.interpolate(cell_mask.unsqueeze(1), size=(H, W), mode="nearest")


def deletion_insertion_curves(
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    steps: int = 16,
    mode: Literal["deletion", "insertion"] = "deletion",
    fill: Literal["noise", "blur", "black"] | Tensor = "blur",
    patch_level: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Deletion / insertion curves (Petsiuk et al. 2018, as used in the Grad-ECLIP evaluation).

    Units (the ``gh * gw`` patch cells when ``patch_level``, else the ``H * W`` pixels of the
    bilinearly upsampled map) are ranked from most to least important (descending map value, ties
    broken by lower flat index first, so an all-zero map deletes in raster order). At step
    ``i = 0..steps`` the top ``round(i * P / steps)`` units are changed:

    * ``deletion``: start from the image, replace the top units by the fill;
    * ``insertion``: start from the fill image, put the top units of the image back.

    ``score_fn`` is called exactly ``steps + 1`` times, each on the whole batch ``[N, 3, H, W]``
    (under ``torch.no_grad()``), and must return ``[N]`` scores (e.g. cosine with the text).

    Args:
        score_fn: ``[N, 3, H, W] -> [N]``.
        images: ``[N, 3, H, W]`` float, in whatever space ``score_fn`` expects.
        maps: ``[N, gh, gw]`` importance maps.
        steps: number of steps (curve has ``steps + 1`` points).
        mode: ``"deletion"`` or ``"insertion"``.
        fill: ``"blur"`` (gaussian blur of the image, :func:`gaussian_blur`), ``"noise"`` (uniform
            ``[0, 1)`` noise drawn from ``generator``, once per call, shared across steps),
            ``"black"`` (zeros), or a tensor broadcastable to ``images`` (e.g. a per-channel
            baseline). "black" and "noise" are in the *images' own space*: zeros of a
            mean/std-normalised image are the dataset mean, not black, and ``[0, 1)`` noise is
            only in range for ``[0, 1]`` images; callers must pass images consistently (either
            all ``[0, 1]`` with normalisation inside ``score_fn``, or all normalised with a
            tensor ``fill``).
        patch_level: rank patch cells (True) or pixels (False).
        generator: torch generator for ``"noise"`` (its device decides where noise is drawn, so a
            CPU generator gives device-independent noise).

    Returns:
        ``[N, steps + 1]`` float curves on the images' device; column 0 is the unmodified image
        (deletion) or the pure fill (insertion).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    steps = int(steps)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    images = _as_float(images)
    maps = _as_float(maps).to(images.device)
    if images.ndim != 4 or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"need images [N,3,H,W] and maps [N,gh,gw], got {tuple(images.shape)}, {tuple(maps.shape)}")
    N, _, H, W = images.shape
    gh, gw = maps.shape[-2:]
    values = torch.nan_to_num(maps if patch_level else upsample_maps(maps, (H, W)), nan=-math.inf)
    ranks = _importance_rank(values.flatten(1))  # [N, P]
    P = ranks.shape[1]

    baseline = _fill_images(images, fill, generator)
    scores = []
    with torch.no_grad():
        for i in range(steps + 1):
            k = (i * P + steps // 2) // steps  # round(i * P / steps), exact integers
            changed = (ranks < k).to(images.dtype)
            if patch_level:
                m = _cells_to_pixels(changed.view(N, gh, gw), (H, W))
            else:
                m = changed.view(N, 1, H, W)
            if mode == "deletion":
                batch = images * (1 - m) + baseline * m
            else:
                batch = baseline * (1 - m) + images * m
            s = torch.as_tensor(score_fn(batch))
            if s.shape != (N,):
                s = s.reshape(N)
            scores.append(s.detach().to(device=images.device, dtype=torch.float32))
    return torch.stack(scores, dim=1)


def auc(curves: Tensor) -> Tensor:
    """Normalised area under ``[N, S + 1]`` curves sampled at ``x = 0, 1/S, ..., 1``.

    Trapezoid rule divided by the number of steps ``S``, so a constant curve ``c`` gives ``c`` and
    the value lies in the score range. Quantus' ``get_auc_score`` returns the un-normalised
    trapezoid area over unit-spaced x (``S`` times larger); we report the normalised one.

    Returns:
        ``[N]`` (a 1-D curve ``[S + 1]`` gives a 0-dim tensor).
    """
    c = _as_float(curves)
    S = c.shape[-1] - 1
    if S < 1:
        raise ValueError("a curve needs at least 2 points")
    return ((c[..., 1:] + c[..., :-1]) * 0.5).sum(-1) / S


# --------------------------------------------------------------------------------------------
# sanity check: model randomisation
# --------------------------------------------------------------------------------------------
def _average_ranks(x: Tensor) -> Tensor:
    """Row-wise ranks 1..P of ``[N, P]`` with ties given their average rank (float64)."""
    N, P = x.shape
    s, order = torch.sort(x, dim=1, stable=True)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.cumsum(1) - 1 + torch.arange(N, device=x.device).unsqueeze(1) * P  # global group ids
    pos = torch.arange(1, P + 1, dtype=torch.float64, device=x.device).expand(N, P)
    sums = torch.zeros(N * P, dtype=torch.float64, device=x.device).scatter_add_(0, group.flatten(), pos.flatten())
    cnts = torch.zeros(N * P, dtype=torch.float64, device=x.device).scatter_add_(
        0, group.flatten(), torch.ones(N * P, dtype=torch.float64, device=x.device)
    )
    avg_sorted = (sums / cnts.clamp(min=1))[group]
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(1, order, avg_sorted)
    return ranks


def spearman_rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Spearman correlation of ``[N, P]`` tensors (ties get average ranks, as scipy).

    Returns:
        ``[N]`` float64; NaN for a row where ``a`` or ``b`` is constant (or ``P < 2``).
        Behaviour with NaN inputs is unspecified (remove them first).
    """
    a = _as_float(a)
    b = _as_float(b).to(a.device)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [N, P] tensors of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    num = (ra * rb).sum(1)
    den = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    out = num / den
    out = torch.where(den > 0, out.clamp(-1.0, 1.0), torch.full_like(out, math.nan))
    return out


def _reinit_module(block: nn.Module, std: float) -> None:
    for mod in block.modules():
        reset = getattr(mod, "reset_parameters", None) or getattr(mod, "_reset_parameters", None)
        if callable(reset):
            reset()
            continue
        for p in mod.parameters(recurse=False):
            nn.init.normal_(p, mean=0.0, std=std)


def randomize_top_blocks(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    seed: int = 0,
    std: float = 0.02,
) -> nn.Module:
    """Deep copy of ``model`` whose ``blocks`` are re-initialised (cascading randomisation, Adebayo
    et al. 2018); the original model is not modified.

    Each block of the *original* model is located in the copy through its ``named_modules()``
    name. Every submodule with ``reset_parameters()`` (Linear, LayerNorm, Conv, Embedding, ...;
    ``nn.MultiheadAttention``'s ``_reset_parameters()`` too) is reset; a submodule without one has
    its own raw Parameters drawn from ``N(0, std^2)``. The RNG is seeded with ``seed`` inside a
    forked RNG state, so the global RNG is untouched and the result is reproducible.

    Raises:
        ValueError: a block is not a submodule of ``model``.
    """
    names: dict[int, str] = {}  # id(module) -> its first name
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), name)
    wanted = []
    for blk in blocks:
        if id(blk) not in names:
            raise ValueError(f"block {type(blk).__name__} is not a submodule of the model")
        wanted.append(names[id(blk)])
    clone = copy.deepcopy(model)
    clone_mods = dict(clone.named_modules(remove_duplicate=False))
    devices = sorted({p.device.index or 0 for p in clone.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name in wanted:
                _reinit_module(clone_mods[name], std)
    return clone


def model_randomisation_check(maps_trained: Tensor, maps_random: Tensor) -> dict:
    """Adebayo et al. (2018) model-randomisation check: per-image Spearman correlation between
    the map of the trained model and the map of the randomised model.

    A faithful explainer gives a *low* correlation (the map depends on the weights).

    Args:
        maps_trained: ``[N, gh, gw]`` (or ``[..., gh, gw]``) of the trained model.
        maps_random: the same explainer's maps after the randomisation, same shape.

    Returns:
        ``{"mean_spearman": float (NaN-ignoring mean), "per_image": Tensor [N] float64 (NaN for
        constant maps)}``.
    """
    a = _as_float(maps_trained)
    b = _as_float(maps_random).to(a.device)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"maps must have equal shapes [..., gh, gw], got {tuple(a.shape)}, {tuple(b.shape)}")
    lead = a.shape[:-2]
    rho = spearman_rank_correlation(a.reshape(-1, a.shape[-2] * a.shape[-1]), b.reshape(-1, b.shape[-2] * b.shape[-1]))
    rho = rho.reshape(lead)
    return {"mean_spearman": nan_mean(rho), "per_image": rho}
