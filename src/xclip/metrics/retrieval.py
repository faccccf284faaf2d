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


# Counting True per row: summing bools (or bytes) along a row is slow in torch, summing int64 is
# fast. A bool row read as int64 packs 8 entries per word (one per byte); adding up to 127 words
# keeps every byte below 128, so no byte carries into the next nor into the sign bit, and the
# bytes of the sum are exact per-byte counts.
_WORD_BYTES, _GROUP_WORDS = 8, 127
_BLOCK = _WORD_BYTES * _GROUP_WORDS


class _ChunkRanker:
    """Score chunks [r <= rows, cols] and ranks in them, in two buffers reused for every chunk (the
    scores, and a zero-padded bool mask [rows, cols rounded up to _BLOCK] for counting), so the
    memory stays at one chunk whatever the number of chunks."""

    def __init__(self, rows: int, cols: int, like: Tensor):
        self.cols = cols
        self.scores = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
        self.mask = torch.zeros(rows, -(-cols // _BLOCK) * _BLOCK, dtype=torch.bool, device=like.device)

    def score(self, queries: Tensor, keys: Tensor) -> Tensor:
        """``queries [r, D] @ keys [cols, D].T`` -> [r, cols], valid until the next call."""
        return torch.mm(queries, keys.T, out=self.scores[: queries.shape[0]])

    def count(self, compare, scores: Tensor, target: Tensor) -> Tensor:
        """``compare`` (``torch.gt``, ``torch.eq``) of `scores` [r, cols] with `target` [r] -> [r] long."""
        r = scores.shape[0]
        mask = self.mask[:r]
        compare(scores, target[:, None], out=mask[:, : self.cols])  # the padding stays False
        packed = mask.view(torch.int64).view(r, _GROUP_WORDS, -1).sum(1)  # [r, groups] byte-wise counts
        return packed.view(torch.uint8).sum(1, dtype=torch.int64)

    def stable_rank(self, scores: Tensor, target_score: Tensor, target_index: Tensor) -> Tensor:
        """Rank (0 = first) of each row's target in a stable descending sort of `scores` [r, cols]."""
        rank = self.count(torch.gt, scores, target_score)
        # equal scores before the target's own column rank ahead of it; rows with a tie are rare,
        # so only they pay for the column comparison
        tied = torch.nonzero(self.count(torch.eq, scores, target_score) > 1)[:, 0]
        if tied.numel():
            cols = torch.arange(scores.shape[1], device=scores.device)
            rank[tied] += ((scores[tied] == target_score[tied, None]) & (cols[None] < target_index[tied, None])).sum(1)
        return rank


def retrieval_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_elements: int = _CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Ranks of the ground truth in both directions.

    Args:
        image_emb: [I, D] L2-normalised image embeddings.
        text_emb: [T, D] L2-normalised caption embeddings.
        text_to_image: [T] long, the image index of each caption.
        chunk_elements: score-matrix elements computed at once (bounds the memory).
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
    # one direction after the other, so only one direction's chunk buffers exist at a time
    return _t2i_ranks(image_emb, text_emb, text_to_image, chunk_elements), _i2t_ranks(
        image_emb, text_emb, text_to_image, chunk_elements
    )


def _t2i_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_elements: int) -> Tensor:
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    t2i = torch.empty(n_txt, dtype=torch.long, device=image_emb.device)
    step = max(1, chunk_elements // max(n_img, 1))
    ranker = _ChunkRanker(min(step, n_txt), n_img, image_emb)
    for s in range(0, n_txt, step):
        scores = ranker.score(text_emb[s : s + step], image_emb)
        gt = text_to_image[s : s + step]
        t2i[s : s + step] = ranker.stable_rank(scores, scores.gather(1, gt[:, None])[:, 0], gt)
    return t2i


def _i2t_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_elements: int) -> Tensor:
    n_img, n_txt, device = image_emb.shape[0], text_emb.shape[0], image_emb.device
    # captions grouped by image (ascending caption index within an image): image i owns
    # by_image[first[i] : first[i + 1]]
    by_image = torch.argsort(text_to_image, stable=True)
    first = torch.searchsorted(text_to_image[by_image], torch.arange(n_img + 1, device=device))
    i2t = torch.full((n_img,), -1, dtype=torch.long, device=device)
    step = max(1, chunk_elements // max(n_txt, 1))
    ranker = _ChunkRanker(min(step, n_img), n_txt, image_emb)
    for s in range(0, n_img, step):
        e = min(s + step, n_img)
        scores = ranker.score(image_emb[s:e], text_emb)
        own = by_image[first[s] : first[e]]
        row = text_to_image[own] - s
        own_score = scores[row, own]
        best = torch.full((e - s,), float("-inf"), dtype=scores.dtype, device=device).scatter_reduce(
            0, row, own_score, "amax"
        )
        # the best own caption; among equal scores the lowest index, as a stable sort puts it first
        candidate = torch.where(own_score == best[row], own, torch.full_like(own, n_txt))
        best_idx = torch.full((e - s,), n_txt, device=device).scatter_reduce(0, row, candidate, "amin")
        ranks = ranker.stable_rank(scores, best, best_idx)
        i2t[s:e] = torch.where(first[s + 1 : e + 1] > first[s:e], ranks, torch.full_like(ranks, -1))
    return i2t


def retrieval_recall_at_k(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
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
