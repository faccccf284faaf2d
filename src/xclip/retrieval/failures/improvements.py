"""Failure-driven improvements of text->image retrieval, scored per failure category.

Two training-free methods, each turning a caption's scores over the gallery into new ranks:

* prompt-template ensembling: the caption is written into K templates (``"a photo of {}."``);
  its score for an image pools the K template scores: ``mean``, ``max`` or
  ``logsumexp`` (``tau * log sum_k exp(s_k / tau)``, between mean + tau log K and max);
* lexical re-ranking: the top-k images of the plain CLIP ranking are re-sorted by
  ``clip score + weight * lexical similarity`` between the query and the other captions of each
  candidate image (leave-one-out: the query never counts towards its own image). ``tfidf``:
  cosine of TF-IDF vectors (raw counts x smoothed idf over the images' caption documents);
  ``overlap``: the fraction of the query's distinct words found in the candidate's captions.

Ranks follow ``xclip.metrics.retrieval_ranks``' tie rule (a lower image index ranks first).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from xclip.explain.render import figure_to_array, save_png
from xclip.io import atomic_write_csv

POOLINGS = ("mean", "max", "logsumexp")
LEXICAL = ("tfidf", "overlap")
DEFAULT_TEMPLATES = ("{}", "a photo of {}.", "an image of {}.", "a picture of {}.")
_CHUNK_ELEMENTS = 1 << 25  # score elements held at once


def target_ranks(scores: Tensor, target: Tensor) -> Tensor:
    """Rank (0 = first) of column ``target[r]`` in a stable descending sort of each row of
    `scores` [R, I] (ties: the lower index first, as ``xclip.metrics.retrieval_ranks``). [R] long."""
    target_score = scores.gather(1, target[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)
    return (scores > target_score).sum(1) + ((scores == target_score) & (cols[None] < target[:, None])).sum(1)


def templated(captions: Sequence[str], template: str) -> list[str]:
    """Each caption written into `template` (its ``{}``), without a trailing full stop."""
    return [template.format(c.strip().rstrip(".")) for c in captions]


@torch.no_grad()
def encode_templates(backbone, captions: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> Tensor:
    """L2-normalised text embeddings of every caption in every template: [K, T, D] float (CPU)."""
    out = []
    for template in templates:
        texts = templated(captions, template)
        out.append(backbone.encode_texts(texts, batch_size, normalize=True).float().cpu())
    return torch.stack(out)


def pool_scores(scores: Tensor, pooling: str, tau: float = 0.01) -> Tensor:
    """Pool template scores [K, ...] over K: ``mean``, ``max`` or ``logsumexp`` at temperature `tau`."""
    if pooling == "mean":
        return scores.mean(0)
    if pooling == "max":
        return scores.max(0).values
    if pooling == "logsumexp":
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        return tau * torch.logsumexp(scores / tau, dim=0)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")


def ensemble_t2i_ranks(
    image_emb: Tensor,
    template_emb: Tensor,
    text_to_image: Tensor,
    pooling: str,
    tau: float = 0.01,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> Tensor:
    """Rank of each caption's image under pooled template scores.

    Args:
        image_emb: [I, D] L2-normalised.
        template_emb: [K, T, D] L2-normalised (`encode_templates`).
        text_to_image: [T] long.
    Returns:
        [T] long, 0 = the caption's image comes first.
    """
    n_templates, n_text = template_emb.shape[:2]
    ranks = torch.empty(n_text, dtype=torch.long)
    step = max(1, chunk_elements // max(image_emb.shape[0] * n_templates, 1))
    for s in range(0, n_text, step):
        scores = pool_scores(template_emb[:, s : s + step] @ image_emb.T, pooling, tau)  # [c, I]
        ranks[s : s + step] = target_ranks(scores, text_to_image[s : s + step])
    return ranks


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _count_matrix(docs: Sequence[Sequence[str]], vocabulary: Mapping[str, int]) -> Tensor:
    """Word counts of each document (a list of words) as a sparse [N, V] float tensor."""
    rows, cols = [], []
    for i, doc in enumerate(docs):
        rows += [i] * len(doc)
        cols += [vocabulary[w] for w in doc]
    values = torch.ones(len(rows))
    return torch.sparse_coo_tensor(
        torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
        values,
        (len(docs), len(vocabulary)),
        check_invariants=True,
    ).coalesce()


def lexical_scores(query_counts: Tensor, doc_counts: Tensor, idf: Tensor, lexical: str) -> Tensor:
    """Similarity of queries [N, V] and documents [N, V] (dense word counts, row i with row i):
    TF-IDF cosine or the fraction of the query's words present in the document. [N] float."""
    if lexical == "tfidf":
        return F.cosine_similarity(query_counts * idf, doc_counts * idf, dim=1, eps=1e-12)
    if lexical == "overlap":
        present = (query_counts > 0).float()
        return (present * (doc_counts > 0).float()).sum(1) / present.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown lexical similarity {lexical!r}; choose from {LEXICAL}")


def rerank_t2i_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    captions: Sequence[str],
    k: int = 10,
    weight: float = 0.1,
    lexical: str = "tfidf",
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> Tensor:
    """Rank of each caption's image after re-ranking its top-`k` images by
    ``score + weight * lexical(query, other captions of the candidate)``; images beyond the top
    k keep their CLIP rank.

    Args:
        image_emb: [I, D], text_emb: [T, D] L2-normalised; text_to_image: [T] long.
        captions: the T caption strings (the images' documents are their captions).
    Returns:
        [T] long ranks.
    """
    if lexical not in LEXICAL:
        raise ValueError(f"unknown lexical similarity {lexical!r}; choose from {LEXICAL}")
    n_img, n_text = image_emb.shape[0], text_emb.shape[0]
    k = min(k, n_img)
    tokens = [words(c) for c in captions]
    vocabulary = {w: i for i, w in enumerate(sorted({w for doc in tokens for w in doc}))}
    query_counts = _count_matrix(tokens, vocabulary)  # [T, V]
    image_docs: list[list[str]] = [[] for _ in range(n_img)]
    for doc, image in zip(tokens, text_to_image.tolist()):
        image_docs[image] += doc
    doc_counts = _count_matrix(image_docs, vocabulary)  # [I, V]: all captions of each image
    df = torch.zeros(len(vocabulary)).index_add_(0, doc_counts.indices()[1], torch.ones(doc_counts._nnz()))
    idf = torch.log((1.0 + n_img) / (1.0 + df)) + 1.0
    ranks = torch.empty(n_text, dtype=torch.long)
    step = max(1, chunk_elements // max(n_img, k * len(vocabulary), 1))  # bounds [c, I] and [c, k, V]
    for s in range(0, n_text, step):
        scores = text_emb[s : s + step] @ image_emb.T  # [c, I]
        gt = text_to_image[s : s + step]
        top_scores, top = torch.sort(scores, dim=1, descending=True, stable=True)
        top_scores, top = top_scores[:, :k], top[:, :k]  # [c, k]
        queries = query_counts.index_select(0, torch.arange(s, s + len(gt))).to_dense()  # [c, V]
        docs = doc_counts.index_select(0, top.flatten()).to_dense().view(len(gt), k, -1)  # [c, k, V]
        docs = docs - (top == gt[:, None]).unsqueeze(-1).float() * queries[:, None]  # leave the query out
        lex = lexical_scores(
            queries[:, None].expand_as(docs).reshape(len(gt) * k, -1), docs.reshape(len(gt) * k, -1), idf, lexical
        ).view(len(gt), k)
        order = torch.sort(top_scores + weight * lex, dim=1, descending=True, stable=True).indices
        reranked = top.gather(1, order)
        hit = reranked == gt[:, None]
        ranks[s : s + step] = torch.where(hit.any(1), hit.int().argmax(1), target_ranks(scores, gt))
    return ranks


def recall_from_ranks(ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """``{"R@k": fraction of ranks < k}`` (NaN for an empty subset)."""
    n = ranks.numel()
    return {f"R@{k}": (ranks < k).sum().item() / n if n else float("nan") for k in ks}


def improvement_rows(
    ranks: Mapping[str, Tensor],
    subsets: Mapping[str, Tensor],
    ks: Sequence[int] = (1, 5, 10),
    params: Mapping[str, str] | None = None,
) -> list[dict]:
    """Recall@K of every method on every subset: one row per (method, subset).

    Args:
        ranks: method name -> [T] t2i ranks.
        subsets: subset name -> caption indices (long [n]).
        params: method name -> its parameters, for the ``params`` column.
    """
    params = dict(params or {})
    return [
        {
            "method": method,
            "params": params.get(method, ""),
            "subset": subset,
            "n_queries": int(idx.numel()),
            **recall_from_ranks(r[idx], ks),
        }
        for method, r in ranks.items()
        for subset, idx in subsets.items()
    ]


def improvements_chart(rows: Sequence[dict], k: int = 1) -> Figure:
    """Grouped bars: Recall@`k` per subset (groups) and method (bars)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    subsets = list(dict.fromkeys(r["subset"] for r in rows))
    value = {(r["method"], r["subset"]): r[f"R@{k}"] for r in rows}
    fig = Figure(figsize=(max(6.0, 1.3 * len(subsets) + 2.0), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(methods), 1)
    for m, method in enumerate(methods):
        heights = [value.get((method, s), math.nan) for s in subsets]
        ax.bar([i + (m - (len(methods) - 1) / 2) * width for i in range(len(subsets))], heights, width, label=method)
    ax.set_xticks(range(len(subsets)))
    ax.set_xticklabels(
        [f"{s}\n(n={next(r['n_queries'] for r in rows if r['subset'] == s)})" for s in subsets], fontsize=7
    )
    ax.set_ylabel(f"text->image R@{k}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def write_improvements(out_dir: str | Path, rows: Sequence[dict], ks: Sequence[int] = (1, 5, 10)) -> tuple[Path, Path]:
    """``improvements.csv`` (one row per method x subset) and ``improvements.png`` (R@1)."""
    out_dir = Path(out_dir)
    columns = ["method", "params", "subset", "n_queries", *(f"R@{k}" for k in ks)]
    csv_path = atomic_write_csv(out_dir / "improvements.csv", columns, rows)
    png_path = save_png(figure_to_array(improvements_chart(rows, k=ks[0])), out_dir / "improvements.png")
    return csv_path, png_path
