"""Heatmap-vs-annotation metrics of the MIT saliency benchmark (KLD, CC, SIM, NSS, AUC-Judd), as
RichHF-18K reports them for its misalignment heatmaps.

Every function takes a batch of predicted maps ``pred`` [B, h, w] (any non-negative-or-not float
map; e.g. a patch grid) and truth maps ``truth`` [B, H, W] (a binary mask or a density) and returns
[B] float64 scores. ``pred`` is first resized to the truth's size (bilinear, align_corners=False),
as the benchmark resizes the saliency map to the fixation map.

Variant followed: the MIT benchmark's MATLAB code (Bylinskii et al., ``code_forMetrics``):
- KLD = sum G' log(eps + G' / (P' + eps)), P' = P / sum P, G' = G / sum G, eps = 2.2204e-16
  (MATLAB's eps; RichHF's PyTorch port uses 1e-8);
- CC = Pearson correlation of the two maps;
- SIM = sum min(P', G') where each map is first min-max scaled to [0, 1], then scaled to sum 1
  (RichHF's port skips the min-max step);
- NSS = mean of the z-scored P at the pixels where G > 0 (std with N - 1, MATLAB's ``std``);
- AUC-Judd: thresholds = P at the G > 0 pixels sorted descending; TP rate i / n_fix, FP rate
  (#{P >= thr} - i) / (n_pix - n_fix); (0, 0) and (1, 1) added; trapezoid area. The MIT code adds
  random jitter (1e-7) to break ties; here ties are counted exactly as the formula says
  (deterministic: a tied non-fixation pixel counts as a false positive).

A sample whose truth map is all zero has no defined score: NaN (RichHF evaluates only samples with
a non-empty truth map); so does CC or NSS of a constant prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MATLAB_EPS = 2.2204e-16


def _prepare(pred: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Both as float64 [B, H*W], pred resized to truth's grid; inputs checked."""
    pred, truth = torch.as_tensor(pred), torch.as_tensor(truth)
    if pred.ndim != 3 or truth.ndim != 3 or pred.shape[0] != truth.shape[0]:
        raise ValueError(
            f"saliency metrics need pred [B, h, w] and truth [B, H, W] with the same B, "
            f"got {tuple(pred.shape)} and {tuple(truth.shape)}"
        )
    pred, truth = pred.double(), truth.double()
    if not torch.isfinite(pred).all() or not torch.isfinite(truth).all():
        raise ValueError("saliency metrics got NaN or infinite values in pred or truth")
    if (truth < 0).any():
        raise ValueError("the truth map must be non-negative (a mask or a density)")
    if pred.shape[-2:] != truth.shape[-2:]:
        pred = F.interpolate(pred[:, None], size=truth.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return pred.flatten(1), truth.flatten(1)


def _empty_truth(truth: Tensor) -> Tensor:
    return truth.sum(1) <= 0


def _sum_normalised(x: Tensor) -> Tensor:
    total = x.sum(1, keepdim=True)
    return torch.where(total > 0, x / torch.where(total > 0, total, 1.0), torch.zeros_like(x))


def _minmax(x: Tensor) -> Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return torch.where(hi > lo, (x - lo) / torch.where(hi > lo, hi - lo, 1.0), torch.zeros_like(x))


def kld(pred: Tensor, truth: Tensor, eps: float = MATLAB_EPS) -> Tensor:
    """KL divergence of the truth from the prediction (lower is better), [B]. `pred` must be
    non-negative (a badness or saliency map)."""
    p, g = _prepare(pred, truth)
    if (p < 0).any():
        raise ValueError("KLD needs a non-negative predicted map (shift or min-max it first)")
    p, gn = _sum_normalised(p), _sum_normalised(g)
    out = (gn * torch.log(eps + gn / (p + eps))).sum(1)
    return out.masked_fill(_empty_truth(g), float("nan"))


def cc(pred: Tensor, truth: Tensor) -> Tensor:
    """Pearson correlation of the two maps, [B] (NaN when either is constant)."""
    p, g = _prepare(pred, truth)
    empty = _empty_truth(g)
    p, g = p - p.mean(1, keepdim=True), g - g.mean(1, keepdim=True)
    den = (p.square().sum(1) * g.square().sum(1)).sqrt()
    out = (p * g).sum(1) / den
    return out.masked_fill((den <= 0) | empty, float("nan"))


def sim(pred: Tensor, truth: Tensor) -> Tensor:
    """Histogram intersection of the two maps, each min-max scaled then scaled to sum 1, [B]."""
    p, g = _prepare(pred, truth)
    out = torch.minimum(_sum_normalised(_minmax(p)), _sum_normalised(_minmax(g))).sum(1)
    return out.masked_fill(_empty_truth(g), float("nan"))


def nss(pred: Tensor, truth: Tensor) -> Tensor:
    """Mean z-scored prediction at the truth's positive pixels (std with N - 1), [B]."""
    p, g = _prepare(pred, truth)
    std = p.std(1, keepdim=True)
    z = (p - p.mean(1, keepdim=True)) / torch.where(std > 0, std, 1.0)
    fix = g > 0
    out = (z * fix).sum(1) / fix.sum(1).clamp_min(1)
    return out.masked_fill((std[:, 0] <= 0) | _empty_truth(g), float("nan"))


def auc_judd(pred: Tensor, truth: Tensor) -> Tensor:
    """AUC-Judd (see the module docstring), [B]; batched over samples with different numbers of
    positive pixels (rows are padded with their last ROC point, which adds no area)."""
    p, g = _prepare(pred, truth)
    b, n = p.shape
    fix = g > 0
    n_fix = fix.sum(1)  # [B]
    # fixation values sorted descending, non-fixations pushed to the end as -inf
    thr = torch.where(fix, p, torch.full_like(p, -torch.inf)).sort(1, descending=True).values
    ascending = p.sort(1).values
    above = n - torch.searchsorted(ascending, thr.contiguous(), side="left")  # #{P >= thr} per threshold
    i = torch.arange(1, n + 1, dtype=torch.float64, device=p.device).expand(b, n)
    valid = i <= n_fix[:, None]
    n_neg = (n - n_fix).clamp_min(1)[:, None].double()
    tp = i / n_fix.clamp_min(1)[:, None]
    fp = (above.double() - i) / n_neg
    last = (n_fix - 1).clamp_min(0)[:, None]
    tp = torch.where(valid, tp, tp.gather(1, last))
    fp = torch.where(valid, fp, fp.gather(1, last))
    zeros, ones = p.new_zeros(b, 1), p.new_ones(b, 1)
    tp, fp = torch.cat([zeros, tp, ones], 1), torch.cat([zeros, fp, ones], 1)
    out = torch.trapezoid(tp, fp, dim=1)
    return out.masked_fill(n_fix == 0, float("nan"))


SALIENCY_METRICS = {"KLD": kld, "CC": cc, "SIM": sim, "NSS": nss, "AUC-Judd": auc_judd}


def saliency_metrics(pred: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """All five metrics, ``{"KLD": [B], "CC": [B], "SIM": [B], "NSS": [B], "AUC-Judd": [B]}``."""
    return {name: fn(pred, truth) for name, fn in SALIENCY_METRICS.items()}
