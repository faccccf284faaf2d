"""Top-1 text->image retrieval failures: which captions miss, what won instead, a seeded sample.

A failure is a caption whose own image is not ranked first (``retrieval_ranks``' tie rule: among
equal scores the lower image index ranks first). Its id, ``t<caption index>``, stays valid as long
as the gallery's frozen caption order does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from xclip.io import atomic_write_csv
from xclip.metrics import retrieval_ranks

_CHUNK_ELEMENTS = 1 << 25  # score-matrix elements held at once


@dataclass(frozen=True)
class Failure:
    """One top-1 text->image failure."""

    failure_id: str
    text_index: int
    caption: str
    gt_image: int
    gt_key: str
    retrieved_image: int
    retrieved_key: str
    gt_score: float  # cosine of the caption with its own image
    retrieved_score: float  # cosine with the wrongly retrieved top-1 image
    gt_rank: int  # 0-based rank of the own image (>= 1 for a failure)


FAILURE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Failure))


def failure_id(text_index: int) -> str:
    """The id of the failure of caption `text_index`."""
    return f"t{int(text_index):06d}"


def top1_failures(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_elements: int = _CHUNK_ELEMENTS
) -> dict[str, Tensor]:
    """Every caption whose image is not its top-1, in caption order.

    Args:
        image_emb: [I, D] L2-normalised image embeddings.
        text_emb: [T, D] L2-normalised caption embeddings.
        text_to_image: [T] long, each caption's image.
    Returns:
        ``{"text_index", "gt_image", "retrieved_image", "gt_rank"}`` (long [F]) and
        ``{"gt_score", "retrieved_score"}`` (float [F]), on the CPU.
    """
    t2i_rank, _ = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_elements=chunk_elements)
    text_index = torch.nonzero(t2i_rank > 0).flatten()
    gt = text_to_image.to(image_emb.device)[text_index]
    retrieved = torch.empty_like(text_index)
    gt_score = torch.empty(len(text_index), dtype=image_emb.dtype, device=image_emb.device)
    retrieved_score = torch.empty_like(gt_score)
    step = max(1, chunk_elements // max(image_emb.shape[0], 1))
    for s in range(0, len(text_index), step):
        scores = text_emb[text_index[s : s + step]] @ image_emb.T
        best = scores.max(1)  # the first maximum: the same tie rule as the ranks
        retrieved[s : s + step] = best.indices
        retrieved_score[s : s + step] = best.values
        gt_score[s : s + step] = scores.gather(1, gt[s : s + step, None])[:, 0]
    return {
        "text_index": text_index.cpu(),
        "gt_image": gt.cpu(),
        "retrieved_image": retrieved.cpu(),
        "gt_rank": t2i_rank[text_index].cpu(),
        "gt_score": gt_score.float().cpu(),
        "retrieved_score": retrieved_score.float().cpu(),
    }


def failure_records(top1: dict[str, Tensor], captions: Sequence[str], image_keys: Sequence[str]) -> list[Failure]:
    """`top1_failures` output as `Failure` rows, with the captions' text and the images' keys."""
    rows = zip(
        *(
            top1[k].tolist()
            for k in ("text_index", "gt_image", "retrieved_image", "gt_score", "retrieved_score", "gt_rank")
        )
    )
    return [
        Failure(failure_id(t), t, captions[t], gt, image_keys[gt], ret, image_keys[ret], gs, rs, rank)
        for t, gt, ret, gs, rs, rank in rows
    ]


def sample_failures(failures: Sequence[Failure], n: int, seed: int) -> list[Failure]:
    """A seeded sample of `n` failures (all of them when there are fewer), in caption order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    picked = np.random.default_rng(seed).permutation(len(failures))[:n]
    return [failures[i] for i in sorted(picked.tolist())]


def write_failures_csv(
    path: str | Path, failures: Sequence[Failure], extra: dict[str, Sequence[str]] | None = None
) -> Path:
    """Write `failures` as CSV (`FAILURE_COLUMNS`, then one column per `extra` entry, e.g.
    ``{"auto_label": [...]}``, one value per failure)."""
    extra = dict(extra or {})
    rows = [{**asdict(f), **{k: v[i] for k, v in extra.items()}} for i, f in enumerate(failures)]
    return atomic_write_csv(path, [*FAILURE_COLUMNS, *extra], rows)
