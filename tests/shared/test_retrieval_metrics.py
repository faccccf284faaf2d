"""Recall@K against a brute-force stable-sort reference, ties, chunking and the Metric wrapper."""

import torch
from retrieval_problems import brute_force, random_problem

from xclip.metrics import RetrievalRecall, retrieval_ranks, retrieval_recall_at_k


def test_recall_matches_brute_force_multi_caption():
    img, txt, owner = random_problem()
    ks = (1, 5, 10)
    got = retrieval_recall_at_k(img, txt, owner, ks)
    want = brute_force(img, txt, owner, ks)
    assert got == want
    assert 0.05 < got["t2i_R@1"] < 0.95  # a non-trivial problem


def test_recall_ties_are_broken_by_index_like_a_stable_sort():
    img, txt, owner = random_problem(n_img=30, caps=2, dim=4, seed=3, quantise=True)
    scores = txt @ img.T
    assert (scores.unsqueeze(2) == scores.unsqueeze(1)).sum() > scores.numel() * 2  # many ties exist
    ks = (1, 2, 5)
    assert retrieval_recall_at_k(img, txt, owner, ks) == brute_force(img, txt, owner, ks)


def test_chunked_ranks_equal_one_shot_ranks():
    img, txt, owner = random_problem(n_img=50, caps=2, seed=5)
    full = retrieval_ranks(img, txt, owner, chunk_elements=1 << 30)
    tiny = retrieval_ranks(img, txt, owner, chunk_elements=7)  # 1 row per chunk
    assert torch.equal(full[0], tiny[0]) and torch.equal(full[1], tiny[1])


def test_perfect_and_reversed_retrieval():
    img = torch.eye(5)
    assert retrieval_recall_at_k(img, img.clone(), torch.arange(5), ks=(1,)) == {"t2i_R@1": 1.0, "i2t_R@1": 1.0}
    # every caption points at the next image: recall@1 is 0 both ways
    owner = (torch.arange(5) + 1) % 5
    assert retrieval_recall_at_k(img, img.clone(), owner, ks=(1,)) == {"t2i_R@1": 0.0, "i2t_R@1": 0.0}


def test_bad_text_to_image_is_rejected():
    img, txt, owner = random_problem(n_img=4, caps=1)
    try:
        retrieval_recall_at_k(img, txt, owner + 10)
    except ValueError as e:
        assert "outside" in str(e)
    else:
        raise AssertionError("out-of-range text_to_image accepted")


def test_metric_accumulates_shards_and_drops_sampler_repeats():
    img, txt, owner = random_problem(n_img=20, caps=2, seed=7)
    order = torch.argsort(owner, stable=True)  # group captions by image, as batches deliver them
    txt, owner = txt[order], owner[order]
    want = retrieval_recall_at_k(img, txt, owner)
    metric = RetrievalRecall()
    # two "processes" in interleaved order, the second padding with a repeat of image 0
    shards = [list(range(0, 20, 2)), list(range(1, 20, 2)) + [0]]
    for shard in shards:
        for i in shard:
            sel = owner == i
            metric.update(img[i : i + 1], torch.tensor([i]), txt[sel], owner[sel])
    assert metric.compute() == want


def test_ranks_with_every_score_tied_across_many_columns():
    # 2,500 columns: several 1,016-entry counting blocks plus a remainder, every count saturated
    n = 2500
    emb = torch.nn.functional.normalize(torch.ones(n, 4), dim=-1)
    owner = torch.arange(n).flip(0)  # caption t belongs to image n-1-t
    t2i, i2t = retrieval_ranks(emb, emb.clone(), owner, chunk_elements=n * 300)
    # all scores equal: a stable sort keeps index order, so a target ranks at its own index
    assert torch.equal(t2i, owner) and torch.equal(i2t, owner)


def test_ranks_against_a_stable_sort_on_a_wide_tied_problem():
    img, txt, owner = random_problem(n_img=1100, caps=2, dim=3, seed=11, quantise=True)  # wider than a block
    scores = txt @ img.T
    t2i_want = (torch.sort(-scores, dim=1, stable=True).indices == owner[:, None]).int().argmax(1)
    order = torch.sort(-scores.T, dim=1, stable=True).indices  # [I, T]
    own_in_order = owner[order] == torch.arange(len(img))[:, None]
    i2t_want = own_in_order.int().argmax(1)
    t2i, i2t = retrieval_ranks(img, txt, owner, chunk_elements=50_000)
    assert torch.equal(t2i, t2i_want) and torch.equal(i2t, i2t_want)


def test_float64_embeddings_give_the_float64_brute_force_numbers():
    img, txt, owner = random_problem(seed=3)
    img, txt = img.double(), txt.double()
    assert retrieval_recall_at_k(img, txt, owner, (1, 5)) == brute_force(img, txt, owner, (1, 5))
