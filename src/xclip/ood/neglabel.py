"""NegLabel (Jiang et al., ICLR 2024): zero-shot OOD scores against mined negative labels.

Plain tensor functions, batched over images, plus :class:`NegLabelScorer` that holds the text side.
Embeddings may be un-normalised: every function L2-normalises what it compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torch.quantile refuses inputs above 2**24 elements; stay well below it per chunk
_QUANTILE_ELEMENTS = 1 << 22


def neg_mining(candidate_emb: Tensor, id_emb: Tensor, percentile: float = 0.95, keep_ratio: float = 0.15) -> Tensor:
    """Indices of the candidates farthest from the ID classes (NegMining).

    Args:
        candidate_emb: [M, D] text embeddings of candidate negative words.
        id_emb: [C, D] text embeddings of the ID classes.
        percentile: a fraction in [0, 1]; ``s_i`` is this quantile of ``cos(neg_i, id_k)`` over k,
            with linear interpolation (``torch.quantile``'s default), as NegLabel's
            ``CLIPScalableClassifier`` computes it (``torch.quantile(sim, q=pencentile, dim=-1)``).
        keep_ratio: the first ``int(M * keep_ratio)`` candidates by ascending ``s_i`` are kept
            (the reference truncates the same way).
    Returns:
        LongTensor [int(M * keep_ratio)] of candidate indices in ascending ``s_i`` order (equal
        ``s_i`` by index). The order matters: :func:`group_negatives` permutes positions in it.
    """
    if candidate_emb.shape[0] == 0:
        raise ValueError("candidate_emb is empty")
    if not 0 <= percentile <= 1:
        raise ValueError(f"percentile is a fraction in [0, 1], got {percentile}")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    cand, ids = F.normalize(candidate_emb, dim=-1), F.normalize(id_emb, dim=-1)
    step = max(1, _QUANTILE_ELEMENTS // ids.shape[0])
    s = torch.cat(
        [torch.quantile(cand[i : i + step] @ ids.T, percentile, dim=1) for i in range(0, cand.shape[0], step)]
    )
    return torch.argsort(s, stable=True)[: int(cand.shape[0] * keep_ratio)]


def mine_negatives(
    nouns_emb: Tensor, adjs_emb: Tensor, id_emb: Tensor, percentile: float = 0.95, keep_ratio: float = 0.15
) -> tuple[Tensor, Tensor]:
    """:func:`neg_mining` run separately on nouns [Mn, D] and adjectives [Ma, D], as NegLabel does.

    Returns ``(noun_idx, adj_idx)``, each indexing its own input. NegLabel's negative set is
    ``cat([nouns_emb[noun_idx], adjs_emb[adj_idx]])`` in that order.
    """
    return (neg_mining(nouns_emb, id_emb, percentile, keep_ratio), neg_mining(adjs_emb, id_emb, percentile, keep_ratio))


def group_negatives(n_neg: int, n_groups: int, seed: int = 0) -> Tensor:
    """Random equal-size groups of negative indices: LongTensor [G, n_neg // G] on the CPU.

    As in the reference, the last ``n_neg % G`` negatives are dropped first, then the remaining
    positions are permuted and reshaped. The permutation comes from a CPU ``torch.Generator`` seeded
    with `seed`, so it is the same on every device and untouched by the global RNG (the reference
    seeds a CUDA generator, so its groups depend on the device).
    """
    if not 1 <= n_groups <= n_neg:
        raise ValueError(f"n_groups must be in [1, n_neg={n_neg}], got {n_groups}")
    kept = n_neg - n_neg % n_groups
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(kept, generator=generator).view(n_groups, -1)


def neglabel_group_scores(
    image_emb: Tensor, id_emb: Tensor, neg_emb: Tensor, groups: Tensor, tau: float = 0.01
) -> Tensor:
    """Per-group NegLabel scores [N, G] for images [N, D], ID labels [C, D], negatives [M, D].

    ``s_g(x) = sum_k e^{cos(x,y_k)/tau} / (sum_k e^{cos(x,y_k)/tau} + sum_{j in groups[g]} e^{cos(x,n_j)/tau})``,
    evaluated as ``sigmoid(logsumexp_id - logsumexp_g)`` so e^{1/tau} never overflows.
    `groups` [G, m] holds indices into `neg_emb`.
    """
    x = F.normalize(image_emb, dim=-1)
    lse_id = torch.logsumexp(x @ F.normalize(id_emb, dim=-1).T / tau, dim=1)  # [N]
    neg_logits = x @ F.normalize(neg_emb, dim=-1).T / tau  # [N, M]
    lse_neg = torch.logsumexp(neg_logits[:, groups.to(neg_logits.device)], dim=2)  # [N, G]
    return torch.sigmoid(lse_id[:, None] - lse_neg)


def neglabel_score(image_emb: Tensor, id_emb: Tensor, neg_emb: Tensor, groups: Tensor, tau: float = 0.01) -> Tensor:
    """NegLabel score [N]: the mean over groups of :func:`neglabel_group_scores`.

    The same softmax form is used for G = 1 (the reference's ``ngroup == 1`` branch sums raw
    logits instead, a defect not reproduced here).
    """
    return neglabel_group_scores(image_emb, id_emb, neg_emb, groups, tau).mean(dim=1)


class NegLabelScorer(nn.Module):
    """NegLabel with its text side held as buffers: ``forward(image_emb [N, D]) -> scores [N]``.

    Args:
        id_emb: [C, D] ID class text embeddings.
        neg_emb: [M, D] mined negative text embeddings (see :func:`mine_negatives`).
        n_groups: G, the number of negative groups (NegLabel's default is 100).
        seed: seed of :func:`group_negatives`.
        tau: softmax temperature (0.01 = CLIP's logit scale 100).
    """

    id_emb: Tensor  # [C, D]
    neg_emb: Tensor  # [M, D]
    groups: Tensor  # [G, M // G] rows of neg_emb

    def __init__(self, id_emb: Tensor, neg_emb: Tensor, n_groups: int = 100, seed: int = 0, tau: float = 0.01):
        super().__init__()
        self.tau = tau
        self.register_buffer("id_emb", id_emb.detach().clone())
        self.register_buffer("neg_emb", neg_emb.detach().clone())
        self.register_buffer("groups", group_negatives(neg_emb.shape[0], n_groups, seed))

    def group_scores(self, image_emb: Tensor) -> Tensor:
        """Per-group scores [N, G]."""
        return neglabel_group_scores(image_emb, self.id_emb, self.neg_emb, self.groups, self.tau)

    def forward(self, image_emb: Tensor) -> Tensor:
        return self.group_scores(image_emb).mean(dim=1)

    def predicted_class(self, image_emb: Tensor) -> Tensor:
        """Zero-shot ID class [N] (long): the most similar ID label."""
        return (image_emb @ F.normalize(self.id_emb, dim=-1).T).argmax(dim=1)
