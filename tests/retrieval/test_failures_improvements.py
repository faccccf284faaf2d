"""Template ensembling and lexical re-ranking against brute-force references, and the
Recall@K table per method x subset."""

import csv
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from retrieval_problems import random_problem

from xclip.backbones import Backbone
from xclip.metrics import retrieval_ranks
from xclip.retrieval.failures.improvements import (
    encode_templates,
    ensemble_t2i_ranks,
    improvement_rows,
    pool_scores,
    recall_from_ranks,
    rerank_t2i_ranks,
    target_ranks,
    templated,
    words,
    write_improvements,
)


def stable_ranks(scores, owner):
    order = torch.sort(-scores, dim=1, stable=True).indices
    return torch.tensor([order[t].tolist().index(int(owner[t])) for t in range(len(owner))])


def test_target_ranks_break_ties_like_a_stable_sort():
    img, txt, owner = random_problem(n_img=20, caps=2, dim=3, seed=4, quantise=True)
    scores = txt @ img.T
    assert (scores.unsqueeze(2) == scores.unsqueeze(1)).sum() > 2 * scores.numel()  # many ties
    assert torch.equal(target_ranks(scores, owner), stable_ranks(scores, owner))
    assert torch.equal(target_ranks(scores, owner), retrieval_ranks(img, txt, owner)[0])


def test_pooling_math():
    s = torch.tensor([[0.2, 0.5], [0.4, 0.1], [0.3, 0.3]])  # K=3 templates x 2 images
    assert torch.allclose(pool_scores(s, "mean"), torch.tensor([0.3, 0.3]))
    assert torch.allclose(pool_scores(s, "max"), torch.tensor([0.4, 0.5]))
    lse = pool_scores(s, "logsumexp", tau=0.1)
    want = 0.1 * torch.log(torch.exp(s / 0.1).sum(0))
    assert torch.allclose(lse, want)
    assert torch.all(lse >= s.max(0).values) and torch.all(lse <= s.max(0).values + 0.1 * math.log(3) + 1e-6)
    assert torch.allclose(pool_scores(s, "logsumexp", tau=1e-4), s.max(0).values, atol=1e-3)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_scores(s, "median")
    with pytest.raises(ValueError, match="tau"):
        pool_scores(s, "logsumexp", tau=0.0)


def template_problem(k=3, seed=0):
    img, txt, owner = random_problem(n_img=25, caps=2, dim=8, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    templates = torch.stack([F.normalize(txt + 0.5 * torch.randn(txt.shape, generator=g), dim=-1) for _ in range(k)])
    return img, templates, owner


@pytest.mark.parametrize("pooling", ["mean", "max", "logsumexp"])
def test_ensemble_ranks_match_brute_force_and_do_not_depend_on_chunking(pooling):
    img, templates, owner = template_problem()
    pooled = pool_scores(templates @ img.T, pooling, tau=0.05)  # [T, I] in one go
    want = stable_ranks(pooled, owner)
    assert torch.equal(ensemble_t2i_ranks(img, templates, owner, pooling, tau=0.05), want)
    assert torch.equal(ensemble_t2i_ranks(img, templates, owner, pooling, tau=0.05, chunk_elements=10), want)


def test_one_template_is_plain_retrieval_and_mean_pooling_is_the_mean_embedding():
    img, templates, owner = template_problem(k=3)
    assert torch.equal(
        ensemble_t2i_ranks(img, templates[:1], owner, "max"), retrieval_ranks(img, templates[0], owner)[0]
    )
    mean_emb = F.normalize(templates.mean(0), dim=-1)
    assert torch.equal(ensemble_t2i_ranks(img, templates, owner, "mean"), retrieval_ranks(img, mean_emb, owner)[0])


def test_templates_are_filled_and_encoded_per_template():
    assert templated(["A dog runs.", "two cats "], "a photo of {}.") == [
        "a photo of A dog runs.",
        "a photo of two cats.",
    ]

    class CountingBackbone:
        def __init__(self):
            self.calls = []

        def encode_text(self, texts, normalize=False):
            self.calls.append(list(texts))
            emb = torch.tensor([[float(len(t)), 1.0] for t in texts])
            return F.normalize(emb, dim=-1) if normalize else emb

        encode_texts = Backbone.encode_texts  # the real batching over the counted encode_text

    bb = CountingBackbone()
    emb = encode_templates(bb, ["ab", "abcd", "x"], ["{}", "a photo of {}."], batch_size=2)
    assert emb.shape == (2, 3, 2) and len(bb.calls) == 4  # 2 templates x 2 batches
    assert torch.allclose(emb[1, 1], F.normalize(torch.tensor([len("a photo of abcd."), 1.0]), dim=0))


# ---- lexical re-ranking --------------------------------------------------------------------------
def reference_rerank(img, txt, owner, captions, k, weight, lexical):
    """Loops and Counters, straight from the definition."""
    scores = (txt @ img.T).double()
    n_img = img.shape[0]
    docs = [Counter() for _ in range(n_img)]
    for c, i in zip(captions, owner.tolist()):
        docs[i].update(words(c))
    df = Counter(w for d in docs for w in d)
    idf = {w: math.log((1 + n_img) / (1 + df[w])) + 1 for w in df}
    ranks = []
    for t, cap in enumerate(captions):
        order = torch.sort(-scores[t], stable=True).indices.tolist()
        q = Counter(words(cap))
        new = []
        for pos, c in enumerate(order[:k]):
            d = docs[c] - q if c == owner[t] else docs[c]  # leave the query out of its own image
            if lexical == "tfidf":
                dot = sum(q[w] * idf[w] * d[w] * idf[w] for w in q)
                nq = math.sqrt(sum((q[w] * idf[w]) ** 2 for w in q))
                nd = math.sqrt(sum((d[w] * idf[w]) ** 2 for w in d))
                lex = dot / max(nq * nd, 1e-12)
            else:
                lex = sum(1 for w in q if d[w] > 0) / max(len(q), 1)
            new.append((-(float(scores[t, c]) + weight * lex), pos, c))
        reranked = [c for _, _, c in sorted(new)]
        gt = int(owner[t])
        ranks.append(reranked.index(gt) if gt in reranked else order.index(gt))
    return torch.tensor(ranks)


VOCAB = ["red", "blue", "green", "circle", "square", "star", "on", "water", "sand", "left", "of", "a", "two"]


def lexical_problem(seed):
    img, txt, owner = random_problem(n_img=20, caps=3, dim=6, seed=seed)
    g = torch.Generator().manual_seed(seed)
    base = [torch.randint(len(VOCAB), (4,), generator=g).tolist() for _ in range(20)]
    # captions of one image share words (their image's base words) plus noise words
    captions = [
        " ".join(VOCAB[w] for w in base[i][: 2 + t % 3] + torch.randint(len(VOCAB), (2,), generator=g).tolist())
        for t, i in enumerate(owner.tolist())
    ]
    return img, txt, owner, captions


@pytest.mark.parametrize("lexical", ["tfidf", "overlap"])
@pytest.mark.parametrize("seed", [0, 1])
def test_rerank_matches_the_loop_reference(lexical, seed):
    img, txt, owner, captions = lexical_problem(seed)
    want = reference_rerank(img, txt, owner, captions, k=5, weight=0.3, lexical=lexical)
    got = rerank_t2i_ranks(img, txt, owner, captions, k=5, weight=0.3, lexical=lexical)
    assert torch.equal(got, want)
    assert torch.equal(
        rerank_t2i_ranks(img, txt, owner, captions, k=5, weight=0.3, lexical=lexical, chunk_elements=50), want
    )
    base = retrieval_ranks(img, txt, owner)[0]
    assert not torch.equal(got, base)  # the re-ranking changes something
    assert torch.equal(got[base >= 5], base[base >= 5])  # beyond the top k nothing moves


def test_zero_weight_is_the_clip_ranking():
    img, txt, owner, captions = lexical_problem(3)
    assert torch.equal(
        rerank_t2i_ranks(img, txt, owner, captions, k=10, weight=0.0), retrieval_ranks(img, txt, owner)[0]
    )


def test_the_query_never_counts_towards_its_own_image():
    # two images, one caption each; the CLIP scores prefer image 1 for caption 0
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = F.normalize(torch.tensor([[0.6, 0.8], [0.0, 1.0]]), dim=-1)
    owner = torch.tensor([0, 1])
    # image 0's only caption is the query itself: left out, its document is empty, so even a
    # large weight cannot pull image 0 up (counting the query would give it a perfect match)
    ranks = rerank_t2i_ranks(img, txt, owner, ["red circle", "blue star"], k=2, weight=10.0)
    assert ranks.tolist() == [1, 0]
    # a second caption of image 0 that shares the words does pull it to the top
    owner3 = torch.tensor([0, 1, 0])
    txt3 = torch.cat([txt, txt[:1]])
    ranks = rerank_t2i_ranks(img, txt3, owner3, ["red circle", "blue star", "a red circle"], k=2, weight=10.0)
    assert ranks.tolist() == [0, 0, 0]


# ---- table and chart -------------------------------------------------------------------------------
def test_improvement_rows_and_files(tmp_path):
    ranks = {"baseline": torch.tensor([0, 1, 2, 0, 7]), "better": torch.tensor([0, 0, 1, 0, 3])}
    subsets = {"all": torch.arange(5), "failures": torch.tensor([1, 2, 4]), "failures:Object": torch.tensor([4])}
    rows = improvement_rows(ranks, subsets, ks=(1, 5), params={"better": "k=3"})
    assert len(rows) == 6
    assert rows[1] == {
        "method": "baseline",
        "params": "",
        "subset": "failures",
        "n_queries": 3,
        "R@1": 0.0,
        "R@5": 2 / 3,
    }
    assert rows[4] == {
        "method": "better",
        "params": "k=3",
        "subset": "failures",
        "n_queries": 3,
        "R@1": 1 / 3,
        "R@5": 1.0,
    }
    assert (
        recall_from_ranks(torch.tensor([], dtype=torch.long), (1,))["R@1"]
        != recall_from_ranks(torch.tensor([], dtype=torch.long), (1,))["R@1"]
    )  # NaN for an empty subset
    csv_path, png_path = write_improvements(tmp_path, rows, ks=(1, 5))
    with open(csv_path, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["method", "params", "subset", "n_queries", "R@1", "R@5"] and len(table) == 6
    assert png_path.read_bytes()[:4] == b"\x89PNG"
