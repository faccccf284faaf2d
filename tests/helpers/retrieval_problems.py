"""Random image-text retrieval problems and a brute-force Recall@K to check the metrics against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def brute_force(image_emb, text_emb, text_to_image, ks):
    scores = text_emb @ image_emb.T  # [T, I]
    out = {}
    # stable descending sort: equal scores keep index order
    t2i_order = torch.sort(-scores, dim=1, stable=True).indices
    i2t_order = torch.sort(-scores.T, dim=1, stable=True).indices
    for k in ks:
        hits = [text_to_image[t].item() in t2i_order[t, :k].tolist() for t in range(scores.shape[0])]
        out[f"t2i_R@{k}"] = sum(hits) / len(hits)
    for k in ks:
        hits = []
        for i in range(scores.shape[1]):
            own = set(torch.nonzero(text_to_image == i)[:, 0].tolist())
            hits.append(bool(own & set(i2t_order[i, :k].tolist())))
        out[f"i2t_R@{k}"] = sum(hits) / len(hits)
    return out


def random_problem(n_img=40, caps=3, dim=8, seed=0, quantise=False):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    # captions near their image so recall is neither 0 nor 1
    owner = torch.arange(n_img).repeat_interleave(caps)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), dim, generator=g), dim=-1)
    if quantise:  # coarse values create many exact ties
        img, txt = torch.round(img * 2) / 2, torch.round(txt * 2) / 2
    perm = torch.randperm(len(owner), generator=g)
    return img, txt[perm], owner[perm]
