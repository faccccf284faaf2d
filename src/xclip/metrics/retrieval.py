"""Image-text retrieval Recall@K with CLIP_benchmark semantics, computed in bounded memory.

Text->image: for every caption, a hit when its image ranks in the top k among all images.
Image->text: for every image, a hit when ANY of its captions ranks in the top k among all captions.
Ranks break ties by index (a lower index ranks first, as a stable sort would), so results are
deterministic; a rank is counted from a row of scores, never from a sorted full matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 25  # score-matrix elements held at once (128 MiB of float32)


def _stable_rank(scores: Tensor, target_score: Tensor, target_index: Tensor) -> Tensor:
    """Rank (0 = first) of each row's target in a stable descending sort of `scores` [R, C]."""
    cols = torch.arange(scores.shape[1], device=scores.device)
    above = (scores > target_score[:, None]).sum(1)
    tied_before = ((scores == target_score[:, None]) & (cols[None] < target_index[:, None])).sum(1)
    return above + tied_before


def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                    chunk_elements: int = _CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Ranks of the ground truth in both directions.

    Args:
        image_emb: [I, D] L2-normalised image embeddings.
        text_emb: [T, D] L2-normalised caption embeddings.
        text_to_image: [T] long, the image index of each caption.
    Returns:
        ``(t2i_rank [T], i2t_rank [I])``: the rank of each caption's image among all images, and
        of each image's best-ranked caption among all captions (-1 for an image without captions).
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape [{n_txt}], got {tuple(text_to_image.shape)}")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image holds indices outside [0, {n_img})")
    text_to_image = text_to_image.to(image_emb.device)

    t2i = torch.empty(n_txt, dtype=torch.long, device=image_emb.device)
    step = max(1, chunk_elements // max(n_img, 1))
    for s in range(0, n_txt, step):
        scores = text_emb[s : s + step] @ image_emb.T
        gt = text_to_image[s : s + step]
        t2i[s : s + step] = _stable_rank(scores, scores.gather(1, gt[:, None])[:, 0], gt)

    i2t = torch.full((n_img,), -1, dtype=torch.long, device=image_emb.device)
    step = max(1, chunk_elements // max(n_txt, 1))
    for s in range(0, n_img, step):
        scores = image_emb[s : s + step] @ text_emb.T
        own = text_to_image[None, :] == torch.arange(s, s + scores.shape[0], device=scores.device)[:, None]
        has = own.any(1)
        masked = scores.masked_fill(~own, float("-inf"))
        best = masked.max(1).values
        # the best own caption; among equal scores the lowest index, as a stable sort puts it first
        best_idx = ((masked == best[:, None]) & own).int().argmax(1)
        ranks = _stable_rank(scores, best, best_idx)
        i2t[s : s + step] = torch.where(has, ranks, torch.full_like(ranks, -1))
    return t2i, i2t


def retrieval_recall_at_k(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                          ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways: ``{"t2i_R@1": ..., "i2t_R@1": ...}``, fractions in [0, 1].

    `image_emb` [I, D] and `text_emb` [T, D] are L2-normalised; `text_to_image` [T] long maps
    every caption to its image. Images without captions are left out of image->text recall.
    """
    t2i, i2t = retrieval_ranks(image_emb, text_emb, text_to_image)
    i2t = i2t[i2t >= 0]
    out = {}
    for direction, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            # counted in integers, divided in float64: exact fractions, no float32 mean drift
            out[f"{direction}_R@{k}"] = (ranks < k).sum().item() / ranks.numel() if ranks.numel() else float("nan")
    return out
