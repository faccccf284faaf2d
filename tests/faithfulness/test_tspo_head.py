"""The TSPO head: pair labels and patch metrics by hand, an untrained head ranks like the zero-shot
score, export/load/score round trip, `xclip fit` + `xclip test` on cached features, and the shipped
head beats the zero-shot score on held-out ShapesWorld pairs."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from xclip.cli import main
from xclip.data.shapes import ShapesFaithfulness
from xclip.faithfulness import TSPOHead, TSPOScorer, export_head, load_head
from xclip.faithfulness.localisation import pair_statistics, rejected_images
from xclip.faithfulness.patch_metrics import minmax_badness, patch_auc, patch_iou
from xclip.faithfulness.tspo_head import extract_features
from xclip.faithfulness.tspo_module import pair_labels, prompt_pairs

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tspo_head_shapes.yaml"
SHIPPED = ROOT / "checkpoints" / "tspo-head-tiny-shapes"


@pytest.fixture(scope="module")
def bb(tiny_shapes):
    return tiny_shapes


def test_pair_labels_by_hand():
    i, j = prompt_pairs(3)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]
    faithful = torch.tensor([[1, 0, 0], [0, 1, 0]])
    assert pair_labels(faithful, i, j).tolist() == [[1.0, 1.0, 0.5], [0.0, 0.5, 1.0]]


def test_patch_metrics_by_hand():
    prob = torch.tensor([[0.9, 0.6, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    iou = patch_iou(prob, target)
    # row 0: predicted {0, 1}, target {0, 2}: 1 / 3; row 1: both empty -> NaN; row 2: 0 / 1
    assert iou[0].item() == pytest.approx(1 / 3) and math.isnan(iou[1].item()) and iou[2].item() == 0
    auc = patch_auc(prob, target)
    # row 0: error patches 0.9, 0.2 vs clean 0.6, 0.1 -> (0.9>0.6, 0.9>0.1, 0.2<0.6, 0.2>0.1) = 3/4
    assert auc[0].item() == pytest.approx(0.75) and math.isnan(auc[1].item())
    assert patch_auc(torch.tensor([[0.5, 0.5, 0.2]]), torch.tensor([[1, 0, 0]])).item() == pytest.approx(0.75)
    assert minmax_badness(torch.tensor([[1.0, 3.0, 2.0], [2.0, 2.0, 2.0]])).tolist() == [[1.0, 0.0, 0.5], [0.0] * 3]


def test_pair_statistics_by_hand():
    score = torch.tensor([0.9, 0.5, 0.7, 0.2, 0.4, 0.6])
    prompt = torch.tensor([0, 0, 0, 1, 1, 1])
    faithful = torch.tensor([1, 0, 0, 1, 0, 0])
    stats = pair_statistics(score, prompt, faithful)
    # prompt 0: 0.9 beats 0.5 and 0.7; prompt 1: 0.2 loses to 0.4 and 0.6 -> 2 / 4
    assert stats["pair_accuracy"] == pytest.approx(0.5) and stats["n_pairs"] == 4
    assert stats["chosen_is_faithful"] == pytest.approx(0.5) and stats["rejected_is_erroneous"] == pytest.approx(0.5)
    # each prompt's worst image; on a tie (prompt 2) the first by position
    tied = torch.cat([score, torch.tensor([0.3, 0.1, 0.1])])
    assert rejected_images(tied, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])).tolist() == [
        False,
        True,
        False,
        True,
        False,
        False,
        False,
        True,
        False,
    ]


@pytest.fixture(scope="module")
def features(bb):
    data = ShapesFaithfulness(n=6, seed=11, split="test")
    items = [data[i] for i in range(6)]
    images = torch.cat([it["images"] for it in items])
    text = bb.encode_texts([it["prompt"] for it in items], normalize=True).repeat_interleave(4, 0)
    return images, [it["prompt"] for it in items], extract_features(bb, images, text)


def test_an_untrained_head_ranks_like_the_zero_shot_score(bb, features):
    _, _, f = features
    head = TSPOHead(bb.embed_dim, 192, bb.grid_size, init_scale=7.0).eval()
    reward, logits = head(f)
    assert torch.allclose(reward, 7.0 * (f.image * f.text).sum(-1), atol=1e-6)
    assert logits.shape == (24, 64)


def test_export_load_and_score_round_trip(bb, features, tmp_path):
    images, prompts, f = features
    torch.manual_seed(0)
    head = TSPOHead(bb.embed_dim, 192, bb.grid_size, hidden=32)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a head whose global MLP is not zero
    head.eval()
    path = export_head(head, tmp_path / "head", bb, "xclip:tiny-shapes", {"note": "test"}, card="# card\n")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert (
        config["architecture"] == "tspo-head" and config["backbone"] == "xclip:tiny-shapes" and config["note"] == "test"
    )
    loaded = load_head(path)
    want_reward, want_logits = head(f)
    got_reward, got_logits = loaded(f)
    assert torch.allclose(got_reward, want_reward) and torch.allclose(got_logits, want_logits)
    reward, grid = TSPOScorer(path, bb).score(prompts[0], images[:4])
    assert reward.shape == (4,) and grid.shape == (4, 8, 8)
    assert torch.allclose(reward, want_reward[:4], atol=1e-4)
    assert torch.allclose(grid.flatten(1), want_logits[:4].sigmoid(), atol=1e-4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_head(head, path, bb, "xclip:tiny-shapes")
    with torch.no_grad():
        head.scale.fill_(3.0)
    export_head(head, path, bb, "xclip:tiny-shapes", card="# generated\n", overwrite=True)  # replaced on purpose
    assert load_head(path).scale.item() == 3.0 and (path / "README.md").read_text() == "# card\n"  # the card is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]  # no temporary or backup directory left
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architecture": "openclip"}))
    with pytest.raises(ValueError, match="architecture 'openclip', expected 'tspo-head'"):
        load_head(tmp_path / "bad")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_fit_exports_and_test_measures_on_cached_features(tmp_path):
    small = [
        "--data.init_args.n_train",
        "12",
        "--data.init_args.n_val",
        "6",
        "--data.init_args.n_test",
        "1",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_checkpointing",
        "false",
    ]
    shipped = digests(SHIPPED) if SHIPPED.is_dir() else None
    main(
        ["fit", "--config", str(CONFIG), *small, "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1"]
    )
    if shipped is not None:  # the recipe never writes into checkpoints/
        assert digests(SHIPPED) == shipped
    head = next((tmp_path / "logs").glob("*/version_0/model"))  # the export went to the run's log directory
    card = (head / "README.md").read_text()
    assert "head_pair_accuracy" in card and "zero_shot_pair_accuracy" in card
    assert sorted(p.name.split("_")[1] for p in (tmp_path / "cache").glob("*.safetensors")) == ["train", "val"]
    with pytest.raises(SystemExit, match="already exists.*overwrite: true"):  # refused before training
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                *small,
                "--trainer.max_epochs",
                "1",
                "--model.init_args.export_dir",
                str(head),
            ]
        )
    main(["test", "--config", str(CONFIG), *small, "--model.init_args.head_checkpoint", str(head)])
    results = json.loads(max((tmp_path / "logs").glob("*/version_*/results.json")).read_text())
    metrics = results["tspo"]["test"]["metrics"]
    assert results["tspo"]["test"]["n_prompts"] == 1
    for key in (
        "head_pair_accuracy",
        "zero_shot_pair_accuracy",
        "head_patch_iou",
        "crops_patch_iou",
        "crops_patch_auc",
    ):
        assert key in metrics and f"test/faithfulness/tspo/{key}" in results["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "n",
    [
        # the recipe's 100 test prompts: 0.893 vs 0.903, 3 of 300 pairs; the paired bootstrap interval
        # of the difference over prompts is [-0.040, +0.017]: this split cannot tell the two apart
        pytest.param(
            100,
            marks=pytest.mark.xfail(
                strict=True, raises=AssertionError, reason="0.893 vs 0.903 on 100 prompts (inside the split's noise)"
            ),
        ),
        # 1000 held-out prompts (the 100 above and 900 more): 0.900 vs 0.883, interval [+0.007, +0.027]
        1000,
    ],
)
def test_the_shipped_head_beats_the_zero_shot_score_on_held_out_pairs(bb, n):
    data = ShapesFaithfulness(n=n, seed=1000, image_size=64, n_renderings=4, split="test")  # the recipe's test family
    scorer = TSPOScorer(SHIPPED, bb)
    rewards, zero_shot, prompt, faithful = [], [], [], []
    for k in range(len(data)):
        item = data[k]
        reward, _ = scorer.score(item["prompt"], item["images"])
        with torch.no_grad():
            cos = (
                bb.encode_image(bb.normalize(item["images"]), normalize=True)
                @ bb.encode_text([item["prompt"]], normalize=True)[0]
            )
        rewards.append(reward)
        zero_shot.append(cos)
        prompt.append(torch.full((4,), k))
        faithful.append(item["faithful"].long())
    prompt, faithful = torch.cat(prompt), torch.cat(faithful)
    head = pair_statistics(torch.cat(rewards), prompt, faithful)["pair_accuracy"]
    clip = pair_statistics(torch.cat(zero_shot), prompt, faithful)["pair_accuracy"]
    print(f"held-out pair accuracy on {n} prompts: head {head:.4f}, zero-shot {clip:.4f}")
    assert head > clip


def test_every_shipped_folder_loads_by_name_and_a_typo_names_the_available_ones():
    from xclip.cir import load_phi
    from xclip.distill import load_classifier

    by_name, by_path = load_head("xclip:tspo-head-tiny-shapes"), load_head(SHIPPED)
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), k
    assert (
        load_phi("xclip:searle-phi-tiny-shapes").config()
        == load_phi(ROOT / "checkpoints" / "searle-phi-tiny-shapes").config()
    )
    assert load_classifier("xclip:distill-student-shapes")[2]["role"] == "student"
    with pytest.raises(FileNotFoundError, match="did you mean xclip:tspo-head-tiny-shapes"):
        load_head("xclip:tspo-head-tiny")
