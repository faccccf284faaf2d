"""xclip.explain.quality on hand-made maps, masks and oracle score functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from xclip.explain.quality import (
    PointingResult,
    auc,
    deletion_insertion_curves,
    energy_pointing_game,
    energy_pointing_mean,
    gaussian_blur,
    model_randomisation_check,
    nan_mean,
    pointing_game,
    pointing_on,
    randomize_top_blocks,
    spearman_rank_correlation,
    upsample_maps,
)
from xclip.explain.random_map import random_values
from xclip.explain.shapes_eval import REGIONS, patch_regions, region_profile

P = 4  # patch size in the hand-made cases
G = 4  # grid side -> images 16x16


def _cell_mask(cells: list[tuple[int, int]], n_grid: int = G, patch: int = P) -> torch.Tensor:
    """[H, W] bool mask covering the given grid cells."""
    m = torch.zeros(n_grid * patch, n_grid * patch, dtype=torch.bool)
    for r, c in cells:
        m[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = True
    return m


def _hot_map(r: int, c: int, n_grid: int = G) -> torch.Tensor:
    m = torch.zeros(n_grid, n_grid)
    m[r, c] = 1.0
    return m


# ------------------------------------------------------------------------------------- upsample
def test_upsample_maps_shape_and_constant():
    maps = torch.rand(2, 3, G, G)
    up = upsample_maps(maps, (16, 12))
    assert up.shape == (2, 3, 16, 12)
    const = upsample_maps(torch.full((1, G, G), 2.5), (16, 16))
    assert torch.allclose(const, torch.full_like(const, 2.5))
    # bilinear never exceeds the grid's range
    assert up.max() <= maps.max() + 1e-6 and up.min() >= maps.min() - 1e-6


# -------------------------------------------------------------------------------- pointing game
def test_pointing_game_hits_misses_skips_and_all_zero():
    maps = torch.stack(
        [
            _hot_map(1, 1),  # hit: mask on cell (1,1)
            _hot_map(3, 3),  # miss: mask on cell (0,0)
            _hot_map(2, 0),  # empty mask -> skipped, not a hit
            torch.zeros(G, G),  # all zero -> miss, counted
            torch.full((G, G), 0.7),  # constant -> miss, counted as all_zero
        ]
    )
    masks = torch.stack(
        [
            _cell_mask([(1, 1)]),
            _cell_mask([(0, 0)]),
            torch.zeros(16, 16, dtype=torch.bool),
            torch.ones(16, 16, dtype=torch.bool),  # the whole image: any "max" would be inside
            torch.ones(16, 16, dtype=torch.bool),
        ]
    )
    res = pointing_game(maps, masks)
    assert isinstance(res, PointingResult)
    assert res.hits.tolist() == [True, False, False, False, False]
    assert res.valid.tolist() == [True, True, False, True, True]
    assert res.all_zero.tolist() == [False, False, False, True, True]
    assert res.n_skipped == 1
    assert res.accuracy == pytest.approx(1 / 4)
    assert res.all_zero_rate == pytest.approx(2 / 4)
    assert res.hits.dtype == torch.bool and res.hits.shape == (5,)


def test_pointing_game_all_skipped_gives_nan():
    res = pointing_game(_hot_map(0, 0)[None], torch.zeros(1, 16, 16, dtype=torch.bool))
    assert res.n_skipped == 1 and not bool(res.hits.any())
    assert math.isnan(res.accuracy) and math.isnan(res.all_zero_rate)


def test_pointing_game_tolerance_margin():
    # max at cell (0,0) (pixels 0..3); mask starts 2 px to the right of the cell's right edge
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, :, 6:] = True
    m = _hot_map(0, 0)[None]
    # the upsampled argmax is inside cell (0,0), columns <= 3
    up = upsample_maps(m, (16, 16))[0]
    col = int(up.flatten().argmax()) % 16
    assert col <= 3
    gap = 6 - col  # distance from the argmax to the nearest mask pixel (same row)
    assert not pointing_game(m, mask, tolerance=0).hits.item()
    assert not pointing_game(m, mask, tolerance=gap).hits.item()  # TorchRay: distance < tolerance
    assert pointing_game(m, mask, tolerance=gap + 1).hits.item()


def torchray_hit(mask: torch.Tensor, y: int, x: int, tolerance: int) -> bool:
    """TorchRay's PointingGame.evaluate: the disk (v + u) < tolerance**2 around the point meets the mask."""
    v = (torch.arange(mask.shape[0], dtype=torch.float32) - y) ** 2
    u = (torch.arange(mask.shape[1], dtype=torch.float32) - x) ** 2
    accept = (v[:, None] + u[None, :]) < tolerance**2
    return bool((mask & accept).any())


def test_pointing_game_margin_is_a_euclidean_disk_as_torchray():
    # a single mask pixel diagonal to the point: 3 px right and 3 px down is 4.24 px away, so a
    # square neighbourhood of 3 would hit while TorchRay's disk needs a margin of 5
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 16, 16, generator=g) > 0.97
    maps = torch.rand(40, 4, 4, generator=g)
    idx = upsample_maps(maps, (16, 16)).flatten(1).argmax(1)
    diag = torch.zeros(1, 16, 16, dtype=torch.bool)
    point = int(upsample_maps(_hot_map(1, 1)[None], (16, 16)).flatten().argmax())
    py, px = divmod(point, 16)
    diag[0, py + 3, px + 3] = True
    assert not pointing_game(_hot_map(1, 1)[None], diag, tolerance=4).hits.item()
    assert pointing_game(_hot_map(1, 1)[None], diag, tolerance=5).hits.item()
    for t in (1, 2, 3, 5, 8):
        ours = pointing_game(maps, masks, tolerance=t).hits
        expected = [
            torchray_hit(masks[i], int(idx[i]) // 16, int(idx[i]) % 16, t) and bool(masks[i].any()) for i in range(40)
        ]
        assert ours.tolist() == expected, t
    with pytest.raises(ValueError, match="tolerance is a margin in pixels"):
        pointing_game(maps, masks, tolerance=-1)
    # the margin never reaches past the image border
    edge = torch.zeros(1, 16, 16, dtype=torch.bool)
    edge[0, 15, 15] = True
    assert not pointing_game(_hot_map(0, 0)[None], edge, tolerance=3).hits.item()


def test_pointing_on_two_objects_and_leading_dims():
    named = torch.stack([_cell_mask([(0, 0)]), _cell_mask([(3, 3)]), _cell_mask([(1, 2)])])
    other = torch.stack([_cell_mask([(3, 3)]), _cell_mask([(0, 0)]), _cell_mask([(2, 2)])])
    maps = torch.stack([_hot_map(0, 0), _hot_map(0, 0), torch.zeros(G, G)])
    on_named = pointing_on(maps, named)
    on_other = pointing_on(maps, other)
    assert on_named.tolist() == [True, False, False]
    assert on_other.tolist() == [False, True, False]
    # [N, K, gh, gw] with [N, K, H, W]
    res = pointing_game(maps.view(3, 1, G, G).expand(3, 2, G, G), torch.stack([named, other], 1))
    assert res.hits.shape == (3, 2)
    assert res.hits[:, 0].tolist() == on_named.tolist() and res.hits[:, 1].tolist() == on_other.tolist()


def test_pointing_game_accepts_numpy():
    res = pointing_game(_hot_map(1, 1)[None].numpy(), _cell_mask([(1, 1)])[None].numpy())
    assert res.hits.tolist() == [True] and res.accuracy == 1.0


# ------------------------------------------------------------------------------ energy pointing
def test_energy_pointing_exact_values():
    # map at image resolution (identity upsampling): mass 3 inside, 1 outside -> 0.75
    m = torch.zeros(2, 4, 4)
    m[0, 0, 0] = 3.0
    m[0, 3, 3] = 1.0
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    mask[1, :2, :2] = True  # map 1 is all zero -> nan
    e = energy_pointing_game(m, mask)
    assert e[0].item() == pytest.approx(0.75)
    assert math.isnan(e[1].item())
    assert energy_pointing_mean(m, mask) == pytest.approx(0.75)

    # with upsampling: constant map -> share of the mask's area; 1x2 map [3, 1] over a 1x4 image
    const = energy_pointing_game(torch.ones(1, 2, 2), _cell_mask([(0, 0)], n_grid=2, patch=4)[None])
    assert const.item() == pytest.approx(0.25)
    row = energy_pointing_game(torch.tensor([[[3.0, 1.0]]]), torch.tensor([[[True, True, False, False]]]))
    # bilinear (align_corners=False) -> [3, 2.5, 1.5, 1]; left half 5.5 of 8
    assert row.item() == pytest.approx(5.5 / 8)


def test_energy_pointing_empty_mask_nan_and_negative_clamped():
    m = torch.tensor([[[2.0, -5.0], [0.0, 0.0]]])
    full = torch.ones(1, 2, 2, dtype=torch.bool)
    left = torch.zeros(1, 2, 2, dtype=torch.bool)
    left[0, 0, 0] = True
    assert energy_pointing_game(m, left).item() == pytest.approx(1.0)  # negative mass ignored
    assert math.isnan(energy_pointing_game(m, torch.zeros_like(full)).item())
    assert math.isnan(nan_mean(torch.tensor([math.nan])))


# --------------------------------------------------------------------------- deletion/insertion
class _Oracle:
    """score = weighted share of pixels still equal to the original image (counts its calls)."""

    def __init__(self, images: torch.Tensor, weights: torch.Tensor):
        self.images = images
        self.w = weights  # [N, H, W] >= 0
        self.calls = 0
        self.shapes = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.shapes.append(tuple(batch.shape))
        intact = (batch == self.images).all(dim=1).float()
        return (intact * self.w).flatten(1).sum(1) / self.w.flatten(1).sum(1)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.5 * torch.rand(n, 3, size, size, generator=g)  # strictly positive: black != image


def _weights_from_grid(grid: torch.Tensor, patch: int = P) -> torch.Tensor:
    return grid.repeat_interleave(patch, -2).repeat_interleave(patch, -1)


def test_deletion_perfect_map_strictly_decreasing_and_call_count():
    g = torch.Generator().manual_seed(1)
    truth = torch.stack([torch.randperm(G * G, generator=g).float().view(G, G) + 1 for _ in range(3)])
    imgs = _images(3)
    oracle = _Oracle(imgs, _weights_from_grid(truth))
    curves = deletion_insertion_curves(oracle, imgs, truth, steps=16, mode="deletion", fill="black")
    assert curves.shape == (3, 17)
    assert oracle.calls == 17
    assert all(s == (3, 3, 16, 16) for s in oracle.shapes)
    assert torch.allclose(curves[:, 0], torch.ones(3)) and torch.allclose(curves[:, -1], torch.zeros(3))
    assert bool((curves[:, 1:] < curves[:, :-1]).all())


def test_insertion_perfect_map_strictly_increasing():
    g = torch.Generator().manual_seed(2)
    truth = torch.stack([torch.randperm(G * G, generator=g).float().view(G, G) + 1 for _ in range(2)])
    imgs = _images(2)
    oracle = _Oracle(imgs, _weights_from_grid(truth))
    curves = deletion_insertion_curves(oracle, imgs, truth, steps=8, mode="insertion", fill="black")
    assert oracle.calls == 9 and curves.shape == (2, 9)
    assert torch.allclose(curves[:, 0], torch.zeros(2)) and torch.allclose(curves[:, -1], torch.ones(2))
    assert bool((curves[:, 1:] > curves[:, :-1]).all())


def _object_setup():
    """Object = 4 of 16 cells; perfect map = object indicator (+ small distinct ranks), inverted."""
    obj_cells = [(0, 1), (1, 1), (2, 3), (3, 0)]
    obj = torch.zeros(G, G)
    for r, c in obj_cells:
        obj[r, c] = 1.0
    perfect = obj + 0.01 * torch.rand(G, G, generator=torch.Generator().manual_seed(3))
    inverted = 1.0 - obj
    return obj, perfect, inverted


def test_deletion_and_insertion_auc_ordering():
    obj, perfect, inverted = _object_setup()
    n_rand = 8
    imgs = _images(2 + n_rand)
    rand = random_values((n_rand, 1, G, G), 5)[:, 0]
    maps = torch.cat([perfect[None], inverted[None], rand])
    oracle = _Oracle(imgs, _weights_from_grid(obj).expand(len(maps), -1, -1))
    dele = auc(deletion_insertion_curves(oracle, imgs, maps, steps=16, mode="deletion", fill="black"))
    ins = auc(deletion_insertion_curves(oracle, imgs, maps, steps=16, mode="insertion", fill="black"))
    d_perf, d_inv, d_rand = dele[0].item(), dele[1].item(), dele[2:].mean().item()
    i_perf, i_inv, i_rand = ins[0].item(), ins[1].item(), ins[2:].mean().item()
    assert d_perf < d_rand < d_inv
    assert i_perf > i_rand > i_inv
    # perfect deletion of a 4-cell object in 16 steps: curve 1, .75, .5, .25, 0, ... -> area 2/16
    assert d_perf == pytest.approx(2.0 / 16)
    assert d_inv == pytest.approx(1.0 - 2.0 / 16)


def test_uneven_steps_and_pixel_level():
    obj, perfect, _ = _object_setup()
    imgs = _images(1)
    oracle = _Oracle(imgs, _weights_from_grid(obj)[None])
    c = deletion_insertion_curves(oracle, imgs, perfect[None], steps=5, mode="deletion", fill="black")
    assert c.shape == (1, 6) and oracle.calls == 6
    assert c[0, 0].item() == 1.0 and c[0, -1].item() == 0.0
    assert bool((c[0, 1:] <= c[0, :-1]).all())
    # pixel level: ranks the 256 upsampled pixels; endpoints are the same
    oracle2 = _Oracle(imgs, _weights_from_grid(obj)[None])
    c2 = deletion_insertion_curves(
        oracle2, imgs, perfect[None], steps=4, mode="deletion", fill="black", patch_level=False
    )
    assert oracle2.calls == 5 and c2[0, 0].item() == 1.0 and c2[0, -1].item() == 0.0
    # the object's region is where the upsampled perfect map is highest: first quarter deletes
    # most of it (more than a random quarter would on average: 25%)
    assert c2[0, 1].item() < 0.5


def test_fills_blur_and_noise():
    const = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(const), const, atol=1e-6)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noisy).var() < 0.5 * noisy.var()

    imgs = _images(2)
    maps = torch.rand(2, G, G, generator=torch.Generator().manual_seed(1))
    seen = []

    def grab(batch):
        seen.append(batch.clone())
        return batch.mean(dim=(1, 2, 3))

    a = deletion_insertion_curves(grab, imgs, maps, steps=2, fill="noise", generator=torch.Generator().manual_seed(7))
    b = deletion_insertion_curves(grab, imgs, maps, steps=2, fill="noise", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # deletion with noise ends on pure noise in [0, 1) that differs from the image
    last = seen[2]
    assert last.min() >= 0 and last.max() < 1 and not torch.allclose(last, imgs)
    # blur fill: insertion starts from the blurred image
    seen.clear()
    deletion_insertion_curves(grab, imgs, maps, steps=2, mode="insertion", fill="blur")
    assert torch.allclose(seen[0], gaussian_blur(imgs))
    with pytest.raises(ValueError):
        deletion_insertion_curves(grab, imgs, maps, fill="grey")


def test_auc_normalisation():
    assert torch.allclose(auc(torch.full((3, 17), 0.4)), torch.full((3,), 0.4, dtype=torch.float32))
    lin = torch.linspace(1, 0, 9)[None]
    assert auc(lin).item() == pytest.approx(0.5)
    # equals numpy's trapezoid over x in [0, 1]
    y = torch.rand(2, 11, generator=torch.Generator().manual_seed(0))
    ref = np.trapezoid(y.numpy(), x=np.linspace(0, 1, 11), axis=1)
    assert np.allclose(auc(y).numpy(), ref, atol=1e-6)


# --------------------------------------------------------------------------------- sanity check
def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 20), generator=g).float()  # many ties
    b = torch.randint(0, 7, (6, 20), generator=g).float()
    c = torch.rand(6, 20, generator=g)
    d = torch.rand(6, 20, generator=g)
    for x, y in ((a, b), (c, d), (a, c)):
        got = spearman_rank_correlation(x, y)
        ref = [spearmanr(x[i].numpy(), y[i].numpy()).statistic for i in range(x.shape[0])]
        assert np.allclose(got.numpy(), ref, atol=1e-10)
    assert spearman_rank_correlation(c, c).allclose(torch.ones(6, dtype=torch.float64))
    assert spearman_rank_correlation(c, -c).allclose(-torch.ones(6, dtype=torch.float64))
    const = torch.zeros(1, 20)
    assert math.isnan(spearman_rank_correlation(const, c[:1]).item())


def test_model_randomisation_check():
    g = torch.Generator().manual_seed(0)
    m1 = torch.rand(4, G, G, generator=g)
    m2 = torch.rand(4, G, G, generator=g)
    same = model_randomisation_check(m1, m1 * 2 + 1)  # monotone transform: rank-identical
    assert same["mean_spearman"] == pytest.approx(1.0)
    out = model_randomisation_check(m1, torch.cat([m2[:3], torch.zeros(1, G, G)]))
    assert out["per_image"].shape == (4,) and math.isnan(out["per_image"][3].item())
    assert out["mean_spearman"] == pytest.approx(out["per_image"][:3].mean().item())


class _RawParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.scale


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.raw = _RawParam()

    def forward(self, x):
        return self.raw(self.fc(self.ln(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(8, 2)


def test_randomize_top_blocks():
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # make LayerNorm weights "trained" so a reset visibly changes them
        for b in net.blocks:
            b.ln.weight.fill_(2.0)
            b.ln.bias.fill_(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng_before = torch.get_rng_state()
    rnd = randomize_top_blocks(net, [net.blocks[1], net.blocks[2]], seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert rnd is not net and rnd.blocks[2] is not net.blocks[2]
    after_orig = net.state_dict()
    for k, v in before.items():
        assert torch.equal(after_orig[k], v), f"original changed: {k}"
    new = rnd.state_dict()
    for k, v in before.items():
        if k.startswith(("blocks.1.", "blocks.2.")):
            assert not torch.equal(new[k], v), f"not re-initialised: {k}"
        else:
            assert torch.equal(new[k], v), f"changed outside the blocks: {k}"
    assert torch.equal(new["blocks.1.ln.weight"], torch.ones(8))  # LayerNorm reset
    # reproducible with the seed, different with another seed
    again = randomize_top_blocks(net, [net.blocks[1], net.blocks[2]], seed=3).state_dict()
    other = randomize_top_blocks(net, [net.blocks[1], net.blocks[2]], seed=4).state_dict()
    assert torch.equal(again["blocks.2.fc.weight"], new["blocks.2.fc.weight"])
    assert not torch.equal(other["blocks.2.fc.weight"], new["blocks.2.fc.weight"])
    with pytest.raises(ValueError):
        randomize_top_blocks(net, [nn.Linear(2, 2)])


# ------------------------------------------------------------------------------------ baseline
def test_random_baseline_maps():
    a = random_values((3, 2, 5, 7), 11)
    b = random_values((3, 2, 5, 7), 11)
    c = random_values((3, 2, 5, 7), 12)
    assert a.shape == (3, 2, 5, 7) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 1
    ref = torch.rand(3, 2, 5, 7, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, ref)


def test_patch_regions_and_region_profile_hand_case():
    # 4x4 images, 2x2 grid of 2x2 patches. Named object: all of patch (0,0) + one pixel of (0,1);
    # other object: two pixels of (1,1) (half of it: "inside"); patch (1,0) is background.
    named = torch.zeros(2, 4, 4, dtype=torch.bool)
    named[:, 0:2, 0:2] = True
    named[:, 0, 2] = True
    other = torch.zeros(2, 4, 4, dtype=torch.bool)
    other[:, 2, 2:4] = True
    regions = patch_regions(named, other, (2, 2))
    idx = {name: i for i, name in enumerate(REGIONS)}
    expected = torch.tensor([[idx["named inside"], idx["named edge"]], [idx["background"], idx["other inside"]]])
    assert torch.equal(regions, expected.expand(2, 2, 2))
    values = torch.tensor(
        [
            [[1.0, 3.0], [1.0, 3.0]],  # max on the named edge; z = -1, 1, -1, 1 (std 2/sqrt3)
            [[2.0, 2.0], [2.0, 2.0]],
        ]
    )  # constant: skipped, and its maximum counts nowhere
    profile = region_profile(values, named, other)
    z = math.sqrt(3) / 2
    assert profile["mean z"]["named inside"] == pytest.approx(-z)
    assert profile["mean z"]["named edge"] == pytest.approx(z)
    assert profile["mean z"]["background"] == pytest.approx(-z)
    assert profile["mean z"]["other inside"] == pytest.approx(z)
    assert math.isnan(profile["mean z"]["other edge"])
    assert profile["argmax share"] == {
        "named inside": 0.0,
        "named edge": 0.5,
        "other inside": 0.0,
        "other edge": 0.0,
        "background": 0.0,
    }
    # without the other object, its patch is background
    assert patch_regions(named, None, (2, 2))[0, 1, 1] == idx["background"]
