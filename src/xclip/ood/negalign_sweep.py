"""Every NegAlign variant from one set of per-image terms: the lambda sweep and the M1-M3 ablation.

:class:`NegAlignTerms` computes, per image, the terms every toggle combination of
:class:`~xclip.ood.negalign.NegAlignScorer` is made of (NegLabel* before M3 for M1 on/off x M2
on/off, and P_align before M3). :func:`variant_scores` then gives any variant's ``S_final`` for
any lambda from those numbers alone, so a sweep never re-runs the model or the text side; M3's
statistics come from ID calibration rows (:func:`zscore_stats`), never from the scored data.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xclip.ood.negalign import NegAlignScorer, p_align
from xclip.ood.neglabel import neglabel_group_scores

STAR_COLUMNS = {(False, False): "star", (True, False): "star_m1", (False, True): "star_m2", (True, True): "star_m1_m2"}
TERM_COLUMNS = (*STAR_COLUMNS.values(), "p_align")


@dataclass(frozen=True)
class Variant:
    """A toggle combination: M1 top-k groups, M2 object negatives, M3 z-scores, the P_align term."""

    m1: bool = False
    m2: bool = False
    m3: bool = False
    p_align: bool = False

    @property
    def name(self) -> str:
        """``neglabel`` with every toggle off, else the toggles joined by ``+`` (``m1+m3+p_align``)."""
        on = [n for n in ("m1", "m2", "m3", "p_align") if getattr(self, n)]
        return "+".join(on) if on else "neglabel"

    @property
    def star_column(self) -> str:
        return STAR_COLUMNS[(self.m1, self.m2)]


ALL_VARIANTS = tuple(Variant(*flags) for flags in itertools.product((False, True), repeat=4))


class NegAlignTerms(nn.Module):
    """``forward(image_emb [N, D], bg_emb [N, D]) -> {column: [N]}`` for every :data:`TERM_COLUMNS`
    plus ``pred_class`` [N] long.

    `scorer` supplies the text side and M1's k (it must be built with ``m1_topk``); its own
    toggles are not used. Built without object groups (``m2_role_aware=False``) the M2 columns
    are NaN, without ``neg_bg_emb`` the P_align column is: see :attr:`available`.
    """

    def __init__(self, scorer: NegAlignScorer):
        super().__init__()
        if scorer.m1_topk is None:
            raise ValueError("NegAlignTerms needs a scorer built with m1_topk (M1's k)")
        self.scorer = scorer
        self.m1_topk: int = scorer.m1_topk

    @property
    def id_emb(self) -> Tensor:
        return self.scorer.neglabel.id_emb

    def available(self, variant: Variant) -> bool:
        """Whether the text side can score `variant` (M2 needs object groups, P_align background negatives)."""
        return (not variant.m2 or self.scorer.object_groups is not None) and (
            not variant.p_align or self.scorer.neg_bg_emb is not None
        )

    def forward(self, image_emb: Tensor, bg_emb: Tensor) -> dict[str, Tensor]:
        sc, nl = self.scorer, self.scorer.neglabel
        image_emb = image_emb.to(nl.id_emb)
        groups = {False: nl.group_scores(image_emb)}
        if sc.object_groups is not None:
            groups[True] = neglabel_group_scores(image_emb, nl.id_emb, nl.neg_emb, sc.object_groups, nl.tau)
        nan = torch.full(image_emb.shape[:1], math.nan, dtype=image_emb.dtype, device=image_emb.device)
        out = {}
        for (m1, m2), column in STAR_COLUMNS.items():
            g = groups.get(m2)
            out[column] = nan if g is None else g.topk(self.m1_topk, dim=1).values.mean(dim=1) if m1 else g.mean(dim=1)
        pred = nl.predicted_class(image_emb)
        if sc.neg_bg_emb is None:
            out["p_align"] = nan
        else:
            out["p_align"] = p_align(bg_emb.to(nl.id_emb), nl.id_emb[pred], sc.neg_bg_emb, sc.k)
        out["pred_class"] = pred
        return out


def zscore_stats(terms: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
    """``{column: (mean, population std)}`` of the :data:`TERM_COLUMNS` over the given (ID
    calibration) rows, as :meth:`NegAlignScorer.fit_zscore` computes them; a column the text side
    cannot compute (NaN, see :meth:`NegAlignTerms.available`) is left out."""
    stats = {}
    for column in TERM_COLUMNS:
        values = terms[column].double()
        if values.numel() == 0:
            raise ValueError("M3 needs ID calibration rows: none were given")
        if not values.isnan().any():
            stats[column] = (values.mean().item(), values.std(correction=0).item())
    return stats


def zscored(terms: dict[str, Tensor], column: str, stats: dict[str, tuple[float, float]] | None) -> Tensor:
    """``(terms[column] - mean) / std`` with the calibration statistics of `column` (M3)."""
    if stats is None:
        raise ValueError("M3 needs the ID calibration statistics (zscore_stats)")
    mean, std = stats[column]
    if not std > 0:
        raise ValueError(f"M3 statistics of {column} have std {std}: the calibration rows do not vary")
    return (terms[column] - mean) / std


def variant_scores(
    terms: dict[str, Tensor], variant: Variant, lam: float, stats: dict[str, tuple[float, float]] | None = None
) -> Tensor:
    """``S_final`` [N] of `variant` at `lam` from :class:`NegAlignTerms` output (any rows).

    Equals ``NegAlignScorer(m1_topk=k if m1, m2_role_aware=m2, m3_zscore=m3, use_p_align=p_align,
    lam=lam)`` with the same M3 statistics; lam = 0 or no P_align gives NegLabel* exactly.
    """
    star = zscored(terms, variant.star_column, stats) if variant.m3 else terms[variant.star_column]
    if not variant.p_align or lam == 0:
        return star
    align = zscored(terms, "p_align", stats) if variant.m3 else terms["p_align"]
    return star + lam * align
