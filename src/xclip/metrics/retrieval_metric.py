"""`RetrievalRecall`: a torchmetrics Metric for image-text Recall@K that syncs across processes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from xclip.metrics.retrieval import retrieval_recall_at_k
from xclip.results import ReportRow


class RetrievalRecall(Metric):
    """Accumulates normalised embeddings keyed by dataset index; `compute` ranks the whole gallery.

    ``update(image_emb [B,D], image_index [B], text_emb [T,D], text_image_index [T])`` where the
    indices are dataset indices (so shards from several processes, or samples a distributed
    sampler repeated, line up again). Returns ``{"t2i_R@k", "i2t_R@k"}``.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs):
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for name in ("image_emb", "image_index", "text_emb", "text_image_index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_emb: Tensor, image_index: Tensor, text_emb: Tensor, text_image_index: Tensor) -> None:
        self.image_emb.append(image_emb.detach().float())
        self.image_index.append(image_index.detach().long())
        self.text_emb.append(text_emb.detach().float())
        self.text_image_index.append(text_image_index.detach().long())

    def ordered(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The accumulated gallery in dataset order, each image and caption once.

        Returns ``(image_index [I], image_emb [I,D], text_emb [T,D], text_to_image [T])``: the
        sorted dataset indices seen, their embeddings, the captions ordered by (image, caption
        slot) and each caption's position in ``image_index``. This order does not depend on how
        the data was sharded, so several processes give the very numbers of one. Reads the local
        state: wrap it in ``sync_context()`` to see every process's share.
        """
        img, img_idx = dim_zero_cat(self.image_emb), dim_zero_cat(self.image_index)
        txt, txt_img = dim_zero_cat(self.text_emb), dim_zero_cat(self.text_image_index)
        # Deduplicate images (a distributed sampler pads with repeats) and order by dataset index.
        uniq, first = _first_occurrence(img_idx)
        # Captions of repeated images are repeated too: keep one copy of each (image, caption slot).
        keep = _unique_captions(txt_img)
        return uniq, img[first], txt[keep], torch.searchsorted(uniq, txt_img[keep])

    def compute(self) -> dict[str, float]:
        _, img, txt, position = self.ordered()
        return retrieval_recall_at_k(img, txt, position, self.ks)


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of `index` and the position of each one's first occurrence."""
    uniq, inverse = torch.unique(index, sorted=True, return_inverse=True)
    order = torch.arange(index.numel(), device=index.device)
    first = torch.full((uniq.numel(),), index.numel(), dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, inverse, order, reduce="amin")
    return uniq, first


def _unique_captions(text_image_index: Tensor) -> Tensor:
    """Positions of captions to keep, ordered by (image, caption slot): the first block of
    captions of each image.

    Captions of one image arrive together; a repeated image repeats its whole block, so the k-th
    caption of an image is identified by (image, k) and kept once.
    """
    n = text_image_index.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=text_image_index.device)
    starts = torch.ones(n, dtype=torch.bool, device=text_image_index.device)
    starts[1:] = text_image_index[1:] != text_image_index[:-1]
    block = torch.cumsum(starts.long(), 0) - 1
    block_start = torch.nonzero(starts)[:, 0]
    slot = torch.arange(n, device=text_image_index.device) - block_start[block]
    key = text_image_index * (int(slot.max()) + 1) + slot
    _, first = _first_occurrence(key)
    return first


def recall_report_rows(metrics: Mapping[str, float | None], workflow: str) -> list[ReportRow]:
    """Console report rows of the ``{stage}/t2i_R@k`` / ``{stage}/i2t_R@k`` metrics in `metrics`:
    one row per direction, one column per K."""
    rows = []
    for stage in ("val", "test"):
        for direction, name in (("t2i", "text->image Recall@K (over captions)"),
                                ("i2t", "image->text Recall@K (any caption of the image)")):
            keys = sorted((k for k in metrics if k.startswith(f"{stage}/{direction}_R@")),
                          key=lambda k: int(k.rsplit("@", 1)[1]))
            if keys:
                rows.append(ReportRow(workflow, f"{name} [{stage}]",
                                      {f"R@{k.rsplit('@', 1)[1]}": metrics[k] for k in keys}, keys))
    return rows
