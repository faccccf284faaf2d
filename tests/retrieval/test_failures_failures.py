"""Top-1 failures against a brute-force stable sort, seeded samples, the failures CSV, and the
cards (layout and maps) on a tiny random-init CLIP."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from retrieval_problems import random_problem
from tiny_models import tiny_clip

from xclip.backbones import wrap_model
from xclip.explain import GradECLIP
from xclip.retrieval.failures.cards import caption_maps, render_card, write_cards
from xclip.retrieval.failures.extract import (
    FAILURE_COLUMNS,
    failure_id,
    failure_records,
    sample_failures,
    top1_failures,
    write_failures_csv,
)


def brute_force_failures(img, txt, owner):
    scores = txt @ img.T
    order = torch.sort(-scores, dim=1, stable=True).indices
    out = []
    for t in range(len(owner)):
        rank = order[t].tolist().index(int(owner[t]))
        if rank > 0:
            top = int(order[t, 0])
            out.append((t, int(owner[t]), top, rank, float(scores[t, owner[t]]), float(scores[t, top])))
    return out


@pytest.mark.parametrize("quantise", [False, True])
def test_top1_failures_match_a_stable_sort(quantise):
    img, txt, owner = random_problem(n_img=30, caps=3, dim=6, seed=2, quantise=quantise)
    want = brute_force_failures(img, txt, owner)
    for chunk in (1 << 25, 7):  # one shot and one caption per chunk
        got = top1_failures(img, txt, owner, chunk_elements=chunk)
        rows = list(
            zip(
                got["text_index"].tolist(),
                got["gt_image"].tolist(),
                got["retrieved_image"].tolist(),
                got["gt_rank"].tolist(),
                got["gt_score"].tolist(),
                got["retrieved_score"].tolist(),
            )
        )
        assert [r[:4] for r in rows] == [w[:4] for w in want]
        assert np.allclose([r[4:] for r in rows], [w[4:] for w in want])
    assert 10 < len(want) < len(owner)
    assert all(r[4] <= r[5] for r in want)  # the winner scores at least as high


def test_failure_records_sample_and_csv(tmp_path):
    img, txt, owner = random_problem(n_img=30, caps=3, dim=6, seed=2)
    captions = [f"caption {t}" for t in range(len(owner))]
    keys = [f"img{i:03d}.jpg" for i in range(30)]
    failures = failure_records(top1_failures(img, txt, owner), captions, keys)
    f = failures[0]
    assert f.failure_id == failure_id(f.text_index) == f"t{f.text_index:06d}"
    assert (f.caption, f.gt_key, f.retrieved_key) == (captions[f.text_index], keys[f.gt_image], keys[f.retrieved_image])

    sample = sample_failures(failures, 8, seed=3)
    assert len(sample) == 8 and sample == sample_failures(failures, 8, seed=3)
    assert [s.text_index for s in sample] == sorted(s.text_index for s in sample)
    assert sample != sample_failures(failures, 8, seed=4)
    assert sample_failures(failures, 10_000, seed=0) == failures

    labels = [f"label{i}" for i in range(len(failures))]
    write_failures_csv(tmp_path / "failures.csv", failures, {"auto_label": labels})
    with open(tmp_path / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [*FAILURE_COLUMNS, "auto_label"] and len(rows) == len(failures)
    assert rows[3]["failure_id"] == failures[3].failure_id and rows[3]["auto_label"] == "label3"
    assert float(rows[3]["retrieved_score"]) == pytest.approx(failures[3].retrieved_score)


# ---- cards -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explainer():
    torch.set_num_threads(1)
    return GradECLIP(wrap_model(tiny_clip(0).eval()))


def test_caption_maps_are_the_pairwise_grad_eclip_maps(explainer):
    g = torch.Generator().manual_seed(0)
    gt, retrieved = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    captions = ["a red square", "two blue circles", "a star on water"]
    gt_maps, retrieved_maps = caption_maps(explainer, captions, gt, retrieved)
    bb = explainer.backbone
    full = explainer.image_maps(bb.normalize(torch.cat([gt, retrieved])), captions)  # [6, 3, gh, gw]
    assert gt_maps.shape == (3, *bb.grid_size)
    for i in range(3):
        assert torch.allclose(gt_maps[i], full[i, i], atol=1e-6)
        assert torch.allclose(retrieved_maps[i], full[3 + i, i], atol=1e-6)


def test_card_title_then_gt_left_retrieved_right(explainer, tmp_path):
    img, txt, owner = random_problem(n_img=12, caps=2, dim=6, seed=1)
    failures = failure_records(
        top1_failures(img, txt, owner), [f"caption number {t}" for t in range(24)], [f"img{i}" for i in range(12)]
    )[:3]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(12, 3, 32, 32, generator=g)
    paths = write_cards(explainer, failures, lambda i: images[i], tmp_path / "cards", batch_size=2, cell_size=64)
    assert list(paths) == [f.failure_id for f in failures]
    assert all(p == tmp_path / "cards" / f"{fid}.png" and p.is_file() for fid, p in paths.items())
    f = failures[0]
    title = Image.open(paths[f.failure_id]).text["Title"]
    assert f'"{f.caption}"' in title and "grad_eclip" in title and f.failure_id in title

    # layout: a red ground truth and a blue retrieved image under all-zero maps (labelled as such)
    red, blue = torch.zeros(3, 32, 32), torch.zeros(3, 32, 32)
    red[0], blue[2] = 1.0, 1.0
    zero = torch.zeros(4, 4)
    card = render_card(f, red, zero, blue, zero, cell_size=64).astype(float)
    half = card.shape[1] // 2
    left_red = card[:, :half, 0].mean() - card[:, :half, 2].mean()
    right_red = card[:, half:, 0].mean() - card[:, half:, 2].mean()
    assert left_red > right_red + 10  # ground truth on the left, retrieved on the right
    gt_maps, retrieved_maps = caption_maps(explainer, [f.caption], images[[f.gt_image]], images[[f.retrieved_image]])
    again = render_card(f, images[f.gt_image], gt_maps[0], images[f.retrieved_image], retrieved_maps[0], cell_size=64)
    assert np.array_equal(np.asarray(Image.open(paths[f.failure_id]).convert("RGB")), again)
