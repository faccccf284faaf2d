"""NegAlign: NegLabel plus a background-alignment term, ``S_final = S_NegLabel* + lam * P_align``.

Pieces, all plain tensor functions batched over images:
- role split of the negative vocabulary: :func:`role_scores`, :func:`split_roles`;
- the background of an image from a CAM: :func:`foreground_mask`, :func:`background_embedding`;
- the alignment term :func:`p_align`;
- :class:`NegAlignScorer`, which composes them with the modification toggles M1-M3.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xclip.ood.neglabel import NegLabelScorer, group_negatives, neglabel_group_scores

OBJECT_TEMPLATES = ("a photo of a {}", "a close-up photo of a {}")
BACKGROUND_TEMPLATES = ("a scene of {}", "a background of {}", "a texture of {}")


def _template_mean(emb: Tensor) -> Tensor:
    """[M, T, D] -> [M, D]: the normalised mean of the normalised template embeddings."""
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def role_scores(word_emb: Tensor, obj_emb: Tensor, bg_emb: Tensor) -> Tensor:
    """``r(w) = cos(e(w), E_obj(w)) - cos(e(w), E_bg(w))`` [M]; > 0 leans object, < 0 background.

    Args:
        word_emb: [M, D] embeddings e(w) of the words themselves.
        obj_emb: [M, T_o, D] the words in :data:`OBJECT_TEMPLATES`.
        bg_emb: [M, T_b, D] the words in :data:`BACKGROUND_TEMPLATES`.
    """
    w = F.normalize(word_emb, dim=-1)
    return (w * _template_mean(obj_emb)).sum(-1) - (w * _template_mean(bg_emb)).sum(-1)


def split_roles(r: Tensor, tau: float = 0.05) -> dict[str, Tensor]:
    """Indices by role from :func:`role_scores` [M]: ``r > tau`` object, ``r < -tau`` background, else ambiguous."""
    is_obj, is_bg = r > tau, r < -tau
    return {
        "object": torch.nonzero(is_obj).flatten(),
        "background": torch.nonzero(is_bg).flatten(),
        "ambiguous": torch.nonzero(~(is_obj | is_bg)).flatten(),
    }


def foreground_mask(cam: Tensor, percentile: float = 80.0, dilation: int = 1) -> tuple[Tensor, Tensor]:
    """Foreground patches of CAMs [N, gh, gw]: ``(mask bool [N, gh, gw], valid bool [N])``.

    A patch is foreground when its value is above the image's `percentile` (0-100, linear
    interpolation), so 80 keeps the top 20%. The maximum patches always count as foreground, so a
    CAM whose top values tie at the threshold still has one. The mask is then dilated by `dilation`
    patches (a (2d+1)x(2d+1) max-pool): a margin that keeps object borders out of the background.
    A CAM that is all zero or not finite carries no location: ``valid`` is False and its mask is
    empty, so its background is the whole image.
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    flat = cam.flatten(1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile takes float32/float64 only
    valid = torch.isfinite(flat).all(dim=1) & (flat != 0).any(dim=1)
    flat = torch.where(valid[:, None], flat, torch.zeros_like(flat))
    threshold = torch.quantile(flat, percentile / 100, dim=1, keepdim=True)
    fg = (flat > threshold) | (flat == flat.amax(dim=1, keepdim=True))
    fg = (fg & valid[:, None]).view(cam.shape)
    if dilation > 0:
        size = 2 * dilation + 1
        fg = F.max_pool2d(fg[:, None].float(), size, stride=1, padding=dilation)[:, 0] > 0
    return fg, valid


def background_embedding(fg_mask: Tensor, embed_region: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Embedding of each image's background: ``(emb [N, D], fell_back bool [N])``.

    Args:
        fg_mask: [N, P] or [N, gh, gw] bool foreground from :func:`foreground_mask`.
        embed_region: maps grid-cell weights [N, P] (1 on the background) to the joint space [N, D];
            pass the backbone's ``region_embedding`` of the same forward (for a CLIP ViT the image
            head, ``ln_post`` then ``proj``, of the mean background token: pooling happens before
            ``ln_post``, as for the CLS token).
    Returns:
        The region embedding of the background. Images with no background patch fall back to all
        patches and are flagged in ``fell_back``.
    """
    bg = ~fg_mask.flatten(1)
    fell_back = ~bg.any(dim=1)
    weights = (bg | fell_back[:, None]).float()  # [N, P]
    return embed_region(weights), fell_back


def p_align(bg_emb: Tensor, pred_class_emb: Tensor, neg_bg_emb: Tensor, k: int = 5) -> Tensor:
    """``P_align = cos(bg, T(c_hat)) - TopKMean_k cos(bg, N_bg)`` [N].

    Args:
        bg_emb: [N, D] background embeddings (:func:`background_embedding`).
        pred_class_emb: [N, D] text embedding of each image's predicted ID class.
        neg_bg_emb: [Mb, D] text embeddings of the background-leaning negatives; k is capped at Mb.
    """
    if neg_bg_emb.shape[0] == 0:
        raise ValueError("neg_bg_emb is empty: P_align needs background negatives")
    bg = F.normalize(bg_emb, dim=-1)
    own = (bg * F.normalize(pred_class_emb, dim=-1)).sum(-1)
    sims = bg @ F.normalize(neg_bg_emb, dim=-1).T  # [N, Mb]
    return own - sims.topk(min(k, sims.shape[1]), dim=1).values.mean(dim=1)


class NegAlignScorer(nn.Module):
    """``S_final = S_NegLabel* + lam * P_align`` with toggles for the NegLabel* modifications.

    ``S_NegLabel*`` starts as plain NegLabel over all mined negatives and G groups, then:
    - M1 (`m1_topk` = k): aggregate the G group scores by the mean of the k largest instead of all
      G, so a few groups that happen to hold a near-synonym of an ID image cannot drag it down.
    - M2 (`m2_role_aware`): the NegLabel term uses only the object-leaning negatives
      (`object_idx`, regrouped into G groups with the same seed); background words that match the
      scene of an ID image no longer count against it.
    - M3 (`m3_zscore`): each term is z-scored, ``(s - mean) / std``, with statistics of ID
      validation data (:meth:`fit_zscore`) or given ones (:meth:`set_zscore_stats`): fixed numbers,
      never statistics of the test batch, so there is no test-time leakage. It puts NegLabel* (whose
      spread is tiny near 1) and P_align on one scale before adding them.
    With every toggle off and ``use_p_align=False``, ``s_final`` is plain NegLabel bit for bit.

    Args:
        id_emb: [C, D] ID class text embeddings; the predicted class's row is T(c_hat).
        neg_emb: [M, D] mined negatives.
        object_idx: [Mo] long, rows of `neg_emb` that lean object (``split_roles(...)["object"]``);
            required by M2.
        neg_bg_emb: [Mb, D] background-leaning negatives' embeddings; required by P_align.
        n_groups, seed, tau: NegLabel's grouping and temperature.
        k: TopKMean size in :func:`p_align`.
    """

    object_groups: Tensor | None  # buffers (None when the toggle that needs them is off)
    neg_bg_emb: Tensor | None
    zscore_stats: Tensor

    def __init__(
        self,
        id_emb: Tensor,
        neg_emb: Tensor,
        *,
        object_idx: Tensor | None = None,
        neg_bg_emb: Tensor | None = None,
        n_groups: int = 100,
        seed: int = 0,
        tau: float = 0.01,
        m1_topk: int | None = None,
        m2_role_aware: bool = False,
        m3_zscore: bool = False,
        use_p_align: bool = True,
        lam: float = 1.0,
        k: int = 5,
    ):
        super().__init__()
        self.neglabel = NegLabelScorer(id_emb, neg_emb, n_groups, seed, tau)
        if m1_topk is not None and not 1 <= m1_topk <= n_groups:
            raise ValueError(f"m1_topk must be in [1, n_groups={n_groups}], got {m1_topk}")
        if m2_role_aware and object_idx is None:
            raise ValueError("m2_role_aware needs object_idx (the object-leaning negatives)")
        if use_p_align and neg_bg_emb is None:
            raise ValueError("use_p_align needs neg_bg_emb (the background-leaning negatives)")
        self.m1_topk, self.m2_role_aware, self.m3_zscore = m1_topk, m2_role_aware, m3_zscore
        self.use_p_align, self.lam, self.k = use_p_align, lam, k
        object_groups = None
        if m2_role_aware:
            object_idx = torch.as_tensor(object_idx, dtype=torch.long).cpu()
            object_groups = object_idx[group_negatives(object_idx.numel(), n_groups, seed)]
        self.register_buffer("object_groups", object_groups)  # [G, Mo // G] rows of neg_emb
        self.register_buffer("neg_bg_emb", None if neg_bg_emb is None else neg_bg_emb.detach().clone())
        # rows (NegLabel*, P_align) x columns (mean, std); NaN until fitted or set
        self.register_buffer("zscore_stats", torch.full((2, 2), math.nan, dtype=torch.float64))

    def _raw_terms(self, image_emb: Tensor, bg_emb: Tensor | None) -> dict[str, Tensor]:
        """Plain NegLabel, NegLabel* before M3, P_align before M3 (NaN if not computable), class."""
        group_scores = self.neglabel.group_scores(image_emb)
        plain = group_scores.mean(dim=1)
        if self.m2_role_aware:
            assert self.object_groups is not None  # __init__ builds them whenever m2_role_aware is on
            nl = self.neglabel
            group_scores = neglabel_group_scores(image_emb, nl.id_emb, nl.neg_emb, self.object_groups, nl.tau)
        if self.m1_topk is not None:
            star = group_scores.topk(self.m1_topk, dim=1).values.mean(dim=1)
        else:
            star = group_scores.mean(dim=1)
        pred = self.neglabel.predicted_class(image_emb)
        if bg_emb is None or self.neg_bg_emb is None:
            align = torch.full_like(plain, math.nan)
        else:
            align = p_align(bg_emb, self.neglabel.id_emb[pred], self.neg_bg_emb, self.k)
        return {"s_neglabel_plain": plain, "s_neglabel_star": star, "p_align": align, "pred_class": pred}

    def _zscore(self, x: Tensor, row: int) -> Tensor:
        mean, std = self.zscore_stats[row].tolist()
        if math.isnan(mean):
            term = ("NegLabel*", "P_align")[row]
            raise RuntimeError(f"M3 needs {term} statistics of ID data: call fit_zscore or set_zscore_stats first")
        return (x - mean) / std

    def set_zscore_stats(self, neglabel: tuple[float, float], p_align: tuple[float, float] | None = None) -> None:
        """Fix the M3 statistics ``(mean, std)`` of NegLabel* and P_align (before M3)."""
        for row, stats in enumerate((neglabel, p_align)):
            if stats is None:
                continue
            if not stats[1] > 0:
                raise ValueError(f"a z-score std must be > 0, got {stats[1]}")
            self.zscore_stats[row] = torch.tensor(stats, dtype=torch.float64)

    @torch.no_grad()
    def fit_zscore(self, image_emb: Tensor, bg_emb: Tensor | None = None, batch_size: int = 1024) -> None:
        """Set the M3 statistics from ID validation images [N, D] (and their backgrounds [N, D]).

        The std is the population std (correction 0). P_align statistics need `bg_emb`.
        """
        parts = [
            self._raw_terms(image_emb[i : i + batch_size], None if bg_emb is None else bg_emb[i : i + batch_size])
            for i in range(0, image_emb.shape[0], batch_size)
        ]
        stats: dict[str, tuple[float, float] | None] = {}
        for name in ("s_neglabel_star", "p_align"):
            values = torch.cat([p[name] for p in parts]).double()
            stats[name] = None if values.isnan().any() else (values.mean().item(), values.std(correction=0).item())
        star = stats["s_neglabel_star"]
        if star is None:
            raise ValueError("fit_zscore: NegLabel* is NaN for some ID images (check the image embeddings)")
        self.set_zscore_stats(star, stats["p_align"])

    def components(self, image_emb: Tensor, bg_emb: Tensor | None = None) -> dict[str, Tensor]:
        """Every term for images [N, D] (backgrounds [N, D]), each [N], so a lambda sweep reuses them.

        Keys: ``s_neglabel_plain`` (unmodified NegLabel), ``s_neglabel_star`` (after M1-M3),
        ``p_align`` (z-scored under M3; NaN without `bg_emb`), ``s_final``, ``pred_class`` (long).
        """
        if self.use_p_align and bg_emb is None:
            raise ValueError("use_p_align needs bg_emb")
        out = self._raw_terms(image_emb, bg_emb)
        if self.m3_zscore:
            out["s_neglabel_star"] = self._zscore(out["s_neglabel_star"], 0)
            if bg_emb is not None and self.neg_bg_emb is not None:
                out["p_align"] = self._zscore(out["p_align"], 1)
        out["s_final"] = self.final_for(out, self.lam) if self.use_p_align else out["s_neglabel_star"]
        return out

    @staticmethod
    def final_for(components: dict[str, Tensor], lam: float) -> Tensor:
        """``S_final`` [N] for another lambda from :meth:`components`; lam = 0 is NegLabel* exactly."""
        if lam == 0:
            return components["s_neglabel_star"]
        return components["s_neglabel_star"] + lam * components["p_align"]

    def forward(self, image_emb: Tensor, bg_emb: Tensor | None = None) -> Tensor:
        return self.components(image_emb, bg_emb)["s_final"]
