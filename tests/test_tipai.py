"""TiPAI scoring: the scores equal their definitions computed another way, the ShapesWorld and
folder configs run through `xclip validate` into the database and figures, a re-run reads the
database back, an interrupted run resumes, and bad inputs are refused by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tipai_fixtures import write_prompt_folder

from xclip.backbones import shared_backbone
from xclip.cli import main
from xclip.data.shapes import ShapesFaithfulness
from xclip.explain import GradECLIP
from xclip.faithfulness import (
    FaithfulnessDatabase,
    PromptFolder,
    TiPAIScorer,
    TSPOHead,
    TSPOScorer,
    export_head,
    read_prompts,
)
from xclip.faithfulness.grid import cell_edges, resample_to_cells

ROOT = Path(__file__).resolve().parents[1]
SHAPES, FOLDER = ROOT / "configs" / "tipai_shapes.yaml", ROOT / "configs" / "tipai_folder.yaml"
SMALL = ["--data.init_args.batch_size", "2", "--model.init_args.grid", "2", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def bb():
    return shared_backbone("xclip:tiny-shapes")


@pytest.fixture(scope="module")
def sample():
    item = ShapesFaithfulness(n=1, seed=3)[0]
    return item["images"][:3], [item["prompt"]] * 3


def test_dense_scores_equal_their_definitions(bb, sample):
    images, prompts = sample
    scorer = TiPAIScorer(bb, grid=3, methods=("dense",))
    text = scorer.text_embeddings(prompts)
    out = scorer.score(images, text)
    x = bb.normalize(images)
    with torch.no_grad():
        image_emb = bb.encode_image(x, normalize=True)  # the library's own encoder
        patches = bb.dense_image_features(x, normalize=True)
    assert torch.allclose(out.global_score, (image_emb * text).sum(-1), atol=1e-5)
    similarity = (patches * text[:, None]).sum(-1).view(3, 8, 8)
    assert torch.allclose(out.maps["dense"], resample_to_cells(similarity.double(), 3, (64, 64)).float(), atol=1e-5)
    # Grad-ECLIP reusing the dense pass equals the explainer's own pair maps
    evidence = GradECLIP(bb).pair_maps(x, text)
    assert torch.allclose(out.maps["dense_gradeclip"], resample_to_cells(evidence.double(), 3, (64, 64)).float(),
                          atol=1e-6)


def test_crop_scores_equal_embedding_each_cell_alone(bb, sample):
    images, prompts = sample
    images = F.interpolate(images[:2], size=(45, 51), mode="bilinear", align_corners=False)  # odd, non-square
    scorer = TiPAIScorer(bb, grid=2, methods=("crops",), crop_batch_size=3)  # chunks of one image
    text = scorer.text_embeddings(prompts[:2])
    got = scorer.score(images, text).maps["crops"]
    ey, ex = cell_edges(45, 2), cell_edges(51, 2)
    for n in range(2):
        for r in range(2):
            for c in range(2):
                cell = images[n : n + 1, :, ey[r] : ey[r + 1], ex[c] : ex[c + 1]]
                cell = F.interpolate(cell, size=(64, 64), mode="bilinear", align_corners=False)
                with torch.no_grad():
                    emb = bb.encode_image(bb.normalize(cell), normalize=True)[0]
                assert got[n, r, c].item() == pytest.approx((emb * text[n]).sum().item(), abs=1e-5)


def test_bad_inputs_are_refused(bb, sample, tmp_path):
    images, prompts = sample
    scorer = TiPAIScorer(bb, grid=2)
    with pytest.raises(ValueError, match="prompts \\[1\\] are empty"):
        scorer.text_embeddings(["a red circle", " "])
    text = scorer.text_embeddings(prompts)
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        scorer.score((images * 255).byte(), text)
    with pytest.raises(ValueError, match="3 images but 2 prompt embeddings"):
        scorer.score(images, text[:2])
    with pytest.raises(ValueError, match="subset of"):
        TiPAIScorer(bb, methods=("patches",))
    (tmp_path / "prompts.json").write_text(json.dumps([{"prompt_id": "a", "prompt": "x"}, {"id": "b"}]))
    with pytest.raises(ValueError, match=r"prompts.json: entry 1 must be an object"):
        read_prompts(tmp_path / "prompts.json")
    (tmp_path / "prompts.json").write_text(json.dumps({"a": "a red circle"}))
    (tmp_path / "b_0.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"prompt ids missing from prompts.json: \['b_0.png'\]"):
        PromptFolder(tmp_path, 64)
    (tmp_path / "b_0.png").unlink()
    (tmp_path / "a_first.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a_first.png: image files must be named <prompt_id>_<seed>"):
        PromptFolder(tmp_path, 64)


def _run(config: Path, root: Path, db: Path, *extra: str) -> dict:
    main(["validate", "--config", str(config), "--trainer.logger.init_args.save_dir", str(root),
          "--model.init_args.db_path", str(db), *SMALL, *extra])
    latest = max(root.glob("*/version_*/results.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    return json.loads(latest.read_text())


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tipai")
    results = _run(SHAPES, root / "logs", root / "tipai.db", "--data.init_args.n", "3")
    return root, results


def test_shapes_config_writes_the_database_figures_and_results(shapes_run):
    root, results = shapes_run
    tipai = results["tipai"]
    assert tipai["prompts_scored"] == 3 and tipai["prompts_from_database"] == 0
    assert tipai["database_rows"] == {"meta": 3, "prompts": 3, "images": 12, "scores": 12 * 4, "pairs": 3}
    metrics = tipai["metrics"]
    for name in ("crops", "dense", "dense_gradeclip", "random"):
        assert f"{name}/AUC-Judd" in metrics and f"val/tipai/{name}/KLD" in results["metrics"]
    assert metrics["pair_accuracy"] == pytest.approx(results["metrics"]["val/tipai/pair_accuracy"], abs=1e-6)
    with FaithfulnessDatabase(root / "tipai.db", readonly=True) as db:
        prompts = db.prompts()
        pid = prompts[0][0]
        images, scores, pairs = db.images(pid), db.scores(pid), db.pairs(pid)
    assert [p for p, _ in prompts] == [f"shapes-val-1000-0000{i}" for i in range(3)]
    assert len(images) == 4 and images[0].png[:4] == b"\x89PNG" and images[0].error is not None
    best = max(images, key=lambda im: scores[im.image_id]["clip"].global_score)
    worst = min(images, key=lambda im: scores[im.image_id]["clip"].global_score)
    assert [(p.chosen_id, p.rejected_id) for p in pairs] == [(best.image_id, worst.image_id)]
    assert scores[best.image_id]["crops"].grid.shape == (2, 2)
    figures = sorted((root / "logs").glob("*/version_0/explanations/tipai/val_*.png"))
    assert [f.name for f in figures] == [f"val_shapes-val-1000-0000{i}.png" for i in range(3)]


@pytest.mark.slow  # three Lightning runs (the database's own crash test is fast: test_faithfulness_db.py)
def test_rerun_reads_the_database_and_interrupted_run_resumes(shapes_run, tmp_path):
    root, first = shapes_run
    with FaithfulnessDatabase(root / "tipai.db", readonly=True) as db:
        clean = db.dump()
    again = _run(SHAPES, tmp_path / "logs", root / "tipai.db", "--data.init_args.n", "3")["tipai"]
    assert again["prompts_scored"] == 0 and again["prompts_from_database"] == 3
    assert again["metrics"] == pytest.approx(first["tipai"]["metrics"], nan_ok=True)
    # a run stopped after its first batch (2 prompts), then started again on the same database
    db = tmp_path / "resumed.db"
    _run(SHAPES, tmp_path / "logs", db, "--data.init_args.n", "3", "--trainer.limit_val_batches", "1")
    resumed = _run(SHAPES, tmp_path / "logs", db, "--data.init_args.n", "3")["tipai"]
    assert resumed["prompts_scored"] == 1 and resumed["prompts_from_database"] == 2
    assert resumed["metrics"] == pytest.approx(first["tipai"]["metrics"], nan_ok=True)
    with FaithfulnessDatabase(db, readonly=True) as reopened:
        assert reopened.dump() == clean


def test_folder_config_skips_an_unreadable_image(tmp_path):
    folder = tmp_path / "generated"
    write_prompt_folder(folder, n=2)
    (folder / "prompt_001_7.png").write_bytes(b"not a png")
    results = _run(FOLDER, tmp_path / "logs", tmp_path / "tipai.db", "--data.init_args.root", str(folder))
    tipai = results["tipai"]
    assert tipai["skipped_paths"] == [str(folder / "prompt_001_7.png")]
    assert tipai["database_rows"]["images"] == 8 and tipai["database_rows"]["pairs"] == 2
    assert "pair_accuracy" not in tipai["metrics"]  # a folder has no ground truth
    with FaithfulnessDatabase(tmp_path / "tipai.db", readonly=True) as db:
        images = db.images("prompt_001")
    assert [im.seed for im in images] == [0, 1, 2, 3]
    assert images[0].path == str(folder / "prompt_001_0.png") and images[0].faithful is None


@pytest.mark.slow  # two Lightning processes: ~1-3 min on 2 cores
def test_two_processes_give_the_single_process_numbers_and_database(shapes_run, tmp_path):
    root, single = shapes_run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    db = tmp_path / "ddp.db"
    # 3 prompts in batches of 2 (as the single run): whole batches per process (BatchAlignedSampler),
    # so every batch, and every number, is the single process's
    cmd = [sys.executable, "-m", "xclip.cli", "validate", "--config", str(SHAPES), "--trainer.logger.init_args.save_dir",
           str(tmp_path / "logs"), "--model.init_args.db_path", str(db), *SMALL, "--data.init_args.n", "3",
           "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "logs").glob("*/version_*/results.json")).read_text())
    assert results["tipai"]["n_images"] == 12
    assert results["tipai"]["metrics"] == pytest.approx(single["tipai"]["metrics"], nan_ok=True)
    with FaithfulnessDatabase(db, readonly=True) as a, FaithfulnessDatabase(root / "tipai.db", readonly=True) as b:
        assert a.dump() == b.dump()


@pytest.mark.slow
def test_dense_and_crop_worst_cells_agree_on_the_error_more_than_chance(bb):
    """On 30 held-out prompts (7x7 grid): the share of erroneous images where both methods' worst
    cells touch the error, against the share two independent random cells would reach, with a
    one-sided binomial test (README: 0.150 vs 0.045 on 100 prompts)."""
    import math

    from xclip.faithfulness.localisation import error_cells, localisation

    data = ShapesFaithfulness(n=30, seed=1000, split="test")
    items = [data[i] for i in range(30)]
    images = torch.cat([it["images"] for it in items])
    masks = torch.cat([it["error_masks"] for it in items])
    scorer = TiPAIScorer(bb, grid=7, crop_batch_size=490)
    text = scorer.text_embeddings([it["prompt"] for it in items]).repeat_interleave(4, 0)
    out = scorer.score(images, text)
    error = masks.flatten(1).any(1)
    crops, dense = localisation(out.maps["crops"], masks)["hit"], localisation(out.maps["dense"], masks)["hit"]
    both = int(((crops == 1) & (dense == 1))[error].sum())
    chance = float(error_cells(masks, 7).flatten(1).double().mean(1)[error].square().mean())
    n = int(error.sum())
    p_value = sum(math.comb(n, k) * chance**k * (1 - chance) ** (n - k) for k in range(both, n + 1))
    assert both / n > chance and p_value < 0.01, (both, n, chance, p_value)


def test_the_head_reward_and_patch_scores_go_to_the_database(bb, tmp_path):
    torch.manual_seed(0)
    head = TSPOHead(bb.embed_dim, 192, bb.grid_size, hidden=16)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reward that differs from the zero-shot cosine
    path = export_head(head.eval(), tmp_path / "head", bb, "xclip:tiny-shapes")
    db = tmp_path / "tipai.db"
    _run(SHAPES, tmp_path / "logs", db, "--data.init_args.n", "2", "--model.init_args.methods", "[dense]",
         "--model.init_args.head", str(path))
    data = ShapesFaithfulness(n=2, seed=1000, image_size=64, n_renderings=4, split="val")  # the config's prompts
    with FaithfulnessDatabase(db, readonly=True) as stored:
        for k in range(2):
            item = data[k]
            reward, error_prob = TSPOScorer(path, bb).score(item["prompt"], item["images"])
            scores = stored.scores(f"shapes-val-1000-{k:05d}")
            ids = [f"shapes-val-1000-{k:05d}_{r}" for r in range(4)]
            got = torch.tensor([scores[i]["head"].global_score for i in ids])
            assert torch.allclose(got, reward, atol=1e-5)
            grid = torch.stack([torch.from_numpy(scores[i]["head"].grid) for i in ids])  # 2x2 cells of the 8x8 map
            assert torch.allclose(grid, 1 - F.avg_pool2d(error_prob[:, None], 4)[:, 0], atol=1e-5)
