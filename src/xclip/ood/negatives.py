"""The text side of NegLabel / NegAlign from words: ID class embeddings, mined negatives, roles.

Every function takes ``embed``: a callable mapping K strings to [K, D] L2-normalised embeddings
(e.g. :class:`~xclip.ood.text_embeddings.TextEmbeddings`), so nothing here runs a model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones.prompts import zero_shot_weights
from xclip.ood.negalign import BACKGROUND_TEMPLATES, OBJECT_TEMPLATES, role_scores, split_roles
from xclip.ood.neglabel import neg_mining

Embed = Callable[[list[str]], Tensor]
ROLES = ("object", "background", "ambiguous")


def id_embeddings(
    embed: Embed, class_names: Sequence[str], prompts: Sequence[str] | Mapping[str, Sequence[str]]
) -> Tensor:
    """ID class embeddings [C, D]: the normalised mean of each class's prompt embeddings.

    `prompts` is either templates with ``{}`` shared by every class, or class name -> its own
    prompts (templates with ``{}`` or literal sentences); every class needs an entry.
    """
    class_names = list(class_names)
    if not class_names:
        raise ValueError("`class_names` is empty: name the ID classes")
    if isinstance(prompts, Mapping):
        missing = [c for c in class_names if not prompts.get(c)]
        if missing:
            raise ValueError(f"`id_prompts` has no prompts for ID class(es) {missing}; it covers {sorted(prompts)}")
        rows = []
        for c in class_names:
            texts = [p.format(c) if "{}" in p else p for p in prompts[c]]
            rows.append(F.normalize(embed(texts).mean(dim=0), dim=-1))
        return torch.stack(rows)
    templates = list(prompts)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(
            f"`id_prompts` must be templates with '{{}}' for the class name (or a class -> prompts "
            f"mapping), got {templates}"
        )
    return zero_shot_weights(embed, class_names, templates)


@dataclass
class Negatives:
    """Negative labels: ``words`` [M], part of speech ``pos`` [M] (``noun``/``adj``), their
    embeddings ``emb`` [M, D] (template-ensembled), role scores ``r`` [M] and ``roles``
    (role -> LongTensor of row indices, see :func:`split_roles`)."""

    words: list[str]
    pos: list[str]
    emb: Tensor
    r: Tensor
    roles: dict[str, Tensor]

    def role_words(self, role: str) -> list[str]:
        return [self.words[i] for i in self.roles[role].tolist()]


def _templated(embed: Embed, words: list[str], templates: Sequence[str], field: str) -> Tensor:
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"`{field}` must be templates with '{{}}' for the word, got {list(templates)}")
    return zero_shot_weights(embed, words, templates) if words else torch.zeros(0, 0)


def build_negatives(
    embed: Embed,
    id_emb: Tensor,
    nouns: list[str],
    adjectives: list[str],
    noun_templates: Sequence[str],
    adj_templates: Sequence[str],
    *,
    mine: bool = True,
    percentile: float = 0.95,
    keep_ratio: float = 0.15,
    role_tau: float = 0.05,
) -> Negatives:
    """Embed the candidate words, keep the NegMining ones (nouns and adjectives separately, unless
    `mine` is False: saved negatives are used as they are) and split them by role.

    Words are embedded in their templates (NegLabel: ``'the nice {}'`` for nouns, ``'This is a {}
    photo'`` for adjectives); the role score uses the bare word and NegAlign's object/background
    templates.
    """
    if not nouns and not adjectives:
        raise ValueError("the negative vocabulary is empty: `nouns` and `adjectives` hold no words")
    noun_emb = _templated(embed, nouns, noun_templates, "noun_templates")
    adj_emb = _templated(embed, adjectives, adj_templates, "adj_templates")
    if mine:
        empty = torch.zeros(0, dtype=torch.long)
        noun_idx = neg_mining(noun_emb, id_emb, percentile, keep_ratio) if nouns else empty
        adj_idx = neg_mining(adj_emb, id_emb, percentile, keep_ratio) if adjectives else empty
    else:
        noun_idx, adj_idx = torch.arange(len(nouns)), torch.arange(len(adjectives))
    words = [nouns[i] for i in noun_idx.tolist()] + [adjectives[i] for i in adj_idx.tolist()]
    if not words:
        raise ValueError(
            f"NegMining kept no negatives from {len(nouns)} nouns and {len(adjectives)} adjectives "
            f"(keep_ratio={keep_ratio}): raise `keep_ratio` or give more words"
        )
    parts = [e[i] for e, i in ((noun_emb, noun_idx), (adj_emb, adj_idx)) if i.numel()]
    emb = torch.cat(parts)
    pos = ["noun"] * noun_idx.numel() + ["adj"] * adj_idx.numel()
    obj, bg = ([t.format(w) for w in words for t in temps] for temps in (OBJECT_TEMPLATES, BACKGROUND_TEMPLATES))
    r = role_scores(
        embed(words),
        embed(obj).view(len(words), len(OBJECT_TEMPLATES), -1),
        embed(bg).view(len(words), len(BACKGROUND_TEMPLATES), -1),
    )
    return Negatives(words, pos, emb, r, split_roles(r, role_tau))
