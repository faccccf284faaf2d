"""`RetrievalRecall`: a torchmetrics Metric for image-text Recall@K that syncs across processes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from xclip.metrics.retrieval import retrieval_recall_at_k
from xclip.metrics.score_table import ScoreTable
from xclip.results import ReportRow


class RetrievalRecall(Metric):
    """Accumulates normalised embeddings keyed by dataset index; `compute` ranks the whole gallery.

    ``update(image_emb [B,D], image_index [B], text_emb [T,D], text_image_index [T])`` where the
    indices are dataset indices (so shards from several processes, or samples a distributed
    sampler repeated, line up again). Returns ``{"t2i_R@k", "i2t_R@k"}``. Images and captions are
    two `ScoreTable`s keyed by (image) and (image, caption slot).
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs):
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        self.images = ScoreTable(int_columns=("index",), vector_columns=("emb",), unique_by=("index",), sort=True)
        self.captions = ScoreTable(
            int_columns=("image", "slot"), vector_columns=("emb",), unique_by=("image", "slot"), sort=True
        )

    def update(self, image_emb: Tensor, image_index: Tensor, text_emb: Tensor, text_image_index: Tensor) -> None:
        self.images.update(index=image_index, emb=image_emb.float())
        self.captions.update(image=text_image_index, slot=caption_slots(text_image_index), emb=text_emb.float())

    def reset(self) -> None:
        super().reset()
        self.images.reset()
        self.captions.reset()

    def ordered(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The accumulated gallery in dataset order, each image and caption once, from every process.

        Returns ``(image_index [I], image_emb [I,D], text_emb [T,D], text_to_image [T])``: the
        sorted dataset indices seen, their embeddings, the captions ordered by (image, caption
        slot) and each caption's position in ``image_index``. This order does not depend on how
        the data was sharded, so several processes give the very numbers of one.
        """
        images, captions = self.images.rows(), self.captions.rows()
        return (images["index"], images["emb"], captions["emb"], torch.searchsorted(images["index"], captions["image"]))

    def compute(self) -> dict[str, float]:
        _, img, txt, position = self.ordered()
        return retrieval_recall_at_k(img, txt, position, self.ks)


def caption_slots(text_image_index: Tensor) -> Tensor:
    """Each caption's slot among its image's captions ([T] int64). Captions of one image arrive
    together, so the k-th caption of a block is slot k; a repeated image repeats its whole block."""
    n = text_image_index.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=text_image_index.device)
    starts = torch.ones(n, dtype=torch.bool, device=text_image_index.device)
    starts[1:] = text_image_index[1:] != text_image_index[:-1]
    block_start = torch.nonzero(starts)[:, 0]
    block = torch.cumsum(starts.long(), 0) - 1
    return torch.arange(n, device=text_image_index.device) - block_start[block]


def recall_report_rows(metrics: Mapping[str, float | None], workflow: str, namespace: str) -> list[ReportRow]:
    """Console report rows of the ``{stage}/{namespace}/t2i_R@k`` / ``.../i2t_R@k`` metrics in
    `metrics`: one row per direction and stage, one column per K."""
    rows = []
    for stage in ("val", "test"):
        for direction, name in (
            ("t2i", "text->image Recall@K (over captions)"),
            ("i2t", "image->text Recall@K (any caption of the image)"),
        ):
            prefix = f"{stage}/{namespace}/{direction}_R@"
            keys = sorted((k for k in metrics if k.startswith(prefix)), key=lambda k: int(k.rsplit("@", 1)[1]))
            if keys:
                rows.append(
                    ReportRow(
                        workflow, f"{name} [{stage}]", {f"R@{k.rsplit('@', 1)[1]}": metrics[k] for k in keys}, keys
                    )
                )
    return rows
