"""Explanation quality of A-D on ShapesWorld, where the truth is known (plain tensors, no Lightning).

For each query the target is explained as the candidate. Judged in the relative form:
- B (map on the target): its maximum on the target's modified object (the changed or added one)
  vs on the target's other objects; queries whose target has both;
- C (map on the reference): its maximum on the objects the target shares with the reference vs
  elsewhere (the changed/removed object or the background); queries with a shared object;
- D (token scores): how often ``$`` is among the two highest-scoring words, vs chance (2 / words).
The pointing game is exact (`xclip.explain.quality.pointing_game`: the argmax pixel of the
bilinearly upsampled map inside the mask; a constant map is a miss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xclip.backbones import Backbone
from xclip.cir.benchmark import ShapesCIRBenchmark
from xclip.cir.explain import CIRExplainer
from xclip.cir.phi import Phi
from xclip.explain.quality import pointing_game
from xclip.explain.random_map import random_values


def pseudo_token_rank(words: Sequence[str], scores: Tensor) -> int:
    """Rank (0 = best) of the ``$`` word among the prompt's words by score (ties: ``$`` last)."""
    slot = list(words).index("$")
    return int((scores > scores[slot]).sum() + ((scores == scores[slot]).sum() - 1))


def collect_maps(backbone: Backbone, phi: Phi, bench: ShapesCIRBenchmark, queries: Sequence[int]) -> dict[str, Tensor]:
    """B and C maps of each query's target and the ``$`` rank in D: ``{"B" [Q, gh, gw], "C" [Q, gh, gw],
    "dollar_rank" [Q], "n_words" [Q]}`` (one batched explanation per query; its one candidate is the target)."""
    explainer = CIRExplainer(backbone, phi)
    b_maps, c_maps, ranks, n_words = [], [], [], []
    for q in queries:  # one query per call: the batching is over a query's candidates
        ref = backbone.normalize(bench.reference_image(q)[None])
        tgt = backbone.normalize(bench.target_image(q)[None])
        ex = explainer.explain(ref, bench.queries[q].captions[0], tgt)
        b_maps.append(ex.candidate_maps[0])
        c_maps.append(ex.reference_maps[0])
        words = ex.prompt_words.words[0]
        ranks.append(pseudo_token_rank(words, ex.prompt_words.word_scores[0, 0, : len(words)]))
        n_words.append(len(words))
    return {
        "B": torch.stack(b_maps),
        "C": torch.stack(c_maps),
        "dollar_rank": torch.tensor(ranks),
        "n_words": torch.tensor(n_words),
    }


def score_maps(bench: ShapesCIRBenchmark, queries: Sequence[int], maps: dict[str, Tensor]) -> dict[str, float]:
    """The criteria from collected maps (or random maps of the same shapes)."""
    truths = [bench.truth(q) for q in queries]
    modified = torch.stack([t.modified for t in truths])
    target_other = torch.stack([t.target_other for t in truths])
    shared = torch.stack([t.shared for t in truths])
    b_rows = modified.flatten(1).any(1) & target_other.flatten(1).any(1)
    c_rows = shared.flatten(1).any(1)
    b_on = pointing_game(maps["B"][b_rows], modified[b_rows])
    b_other = pointing_game(maps["B"][b_rows], target_other[b_rows])
    c_on = pointing_game(maps["C"][c_rows], shared[c_rows])
    top2 = (maps["dollar_rank"] < 2).double()
    return {
        "B_on_modified": b_on.accuracy,
        "B_on_other_objects": b_other.accuracy,
        "B_queries": int(b_rows.sum()),
        "C_on_shared": c_on.accuracy,
        "C_elsewhere": 1.0 - c_on.accuracy,
        "C_queries": int(c_rows.sum()),
        "D_dollar_top2": float(top2.mean()),
        "D_chance_top2": float((2.0 / maps["n_words"].double()).mean()),
        "D_queries": len(queries),
    }


def random_maps(like: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Uniform random maps and a uniformly random ``$`` rank, shaped like `collect_maps`' output."""
    g = torch.Generator().manual_seed(seed)
    n = like["n_words"]
    return {
        "B": random_values(like["B"].shape, g),
        "C": random_values(like["C"].shape, g),
        "dollar_rank": (random_values(n.shape, g) * n).long(),
        "n_words": n,
    }
