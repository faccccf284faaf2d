"""TiPAI scoring: the scores equal their definitions computed another way, the ShapesWorld and
folder configs run through `xclip validate` into the database and figures, a re-run reads the
database back, an interrupted run resumes, and bad inputs are refused by name."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from file_fixtures import write_bomb_png
from tipai_fixtures import write_prompt_folder

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
from xclip.faithfulness.datamodule import check_prompt_id
from xclip.faithfulness.grid import cell_edges, resample_to_cells

ROOT = Path(__file__).resolve().parents[2]
SHAPES, FOLDER = ROOT / "configs" / "tipai_shapes.yaml", ROOT / "configs" / "tipai_folder.yaml"
SMALL = ["--data.init_args.batch_size", "2", "--model.init_args.grid", "2", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def bb(tiny_shapes):
    return tiny_shapes


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
    assert torch.allclose(
        out.maps["dense_gradeclip"], resample_to_cells(evidence.double(), 3, (64, 64)).float(), atol=1e-6
    )


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
    main(
        [
            "validate",
            "--config",
            str(config),
            "--trainer.logger.init_args.save_dir",
            str(root),
            "--model.init_args.db_path",
            str(db),
            *SMALL,
            *extra,
        ]
    )
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
        assert f"{name}/AUC-Judd" in metrics and f"val/faithfulness/tipai/{name}/KLD" in results["metrics"]
    assert metrics["pair_accuracy"] == pytest.approx(
        results["metrics"]["val/faithfulness/tipai/pair_accuracy"], abs=1e-6
    )
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
    figures = sorted((root / "logs").glob("*/version_0/explanations/tipai/val/*.png"))
    assert [f.name for f in figures] == [f"shapes-val-1000-0000{i}.png" for i in range(3)]


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


def test_folder_config_skips_unreadable_images_and_reports_its_counts(tmp_path, capsys):
    folder = tmp_path / "generated"
    write_prompt_folder(folder, n=2)
    (folder / "prompt_001_7.png").write_bytes(b"not a png")
    write_bomb_png(folder / "prompt_000_9.png")  # declares 30000 x 30000 pixels: over MAX_PIXELS
    db = tmp_path / "tipai.db"
    results = _run(FOLDER, tmp_path / "logs", db, "--data.init_args.data_root", str(folder))
    tipai = results["tipai"]
    assert tipai["skipped_paths"] == [str(folder / "prompt_000_9.png"), str(folder / "prompt_001_7.png")]
    assert tipai["database_rows"]["images"] == 8 and tipai["database_rows"]["pairs"] == 2
    assert "pair_accuracy" not in tipai["metrics"]  # a folder has no ground truth
    with FaithfulnessDatabase(db, readonly=True) as stored:
        images = stored.images("prompt_001")
        glob = {
            pid: [stored.scores(pid)[f"{pid}_{s}"]["clip"].global_score for s in range(4)]
            for pid in ("prompt_000", "prompt_001")
        }
    assert [im.seed for im in images] == [0, 1, 2, 3]
    assert images[0].path == str(folder / "prompt_001_0.png") and images[0].faithful is None
    assert images[0].sha256 == hashlib.sha256((folder / "prompt_001_0.png").read_bytes()).hexdigest()
    # the counts are in results.json's metrics and printed, with the database's path
    n = {k.rsplit("/n_", 1)[1]: v for k, v in results["metrics"].items() if "/n_" in k}
    assert n == {
        "prompts": 2,
        "prompts_without_images": 0,
        "prompts_scored": 2,
        "prompts_from_database": 0,
        "images": 8,
        "images_scored": 8,
        "images_rescored": 0,
        "images_from_database": 0,
        "images_skipped": 2,
        "pairs": 2,
    }
    chosen, rejected = [max(g) for g in glob.values()], [min(g) for g in glob.values()]
    assert results["metrics"]["val/faithfulness/tipai/pairs/mean_chosen_score"] == pytest.approx(
        sum(chosen) / 2, abs=1e-6
    )
    assert results["metrics"]["val/faithfulness/tipai/pairs/mean_score_gap"] == pytest.approx(
        (sum(chosen) - sum(rejected)) / 2, abs=1e-6
    )
    out = capsys.readouterr().out
    assert f"TiPAI database: {db} (2 prompts, 8 images, 2 pairs)" in out
    assert "images [val]: 8 (8 new, 0 changed and re-scored, 0 read back from the database); 2 unreadable" in out


def _stored(db: Path) -> dict:
    """prompt_id -> (prompt, {image_id: (path, sha256, global score, crops grid)}, pairs)."""
    with FaithfulnessDatabase(db, readonly=True) as stored:
        out = {}
        for pid, prompt in stored.prompts():
            scores = stored.scores(pid)
            images = {
                im.image_id: (
                    im.path,
                    im.sha256,
                    scores[im.image_id]["clip"].global_score,
                    scores[im.image_id]["crops"].grid,
                )
                for im in stored.images(pid)
            }
            out[pid] = (prompt, images, [(p.chosen_id, p.rejected_id) for p in stored.pairs(pid)])
    return out


def _assert_same_scores(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for pid, (prompt, images, pairs) in want.items():
        assert got[pid][0] == prompt and got[pid][2] == pairs, pid
        assert got[pid][1].keys() == images.keys(), pid
        for image_id, (path, digest, glob, crops) in images.items():
            assert got[pid][1][image_id][:2] == (path, digest)
            assert got[pid][1][image_id][2] == pytest.approx(glob, abs=1e-5)
            assert torch.allclose(torch.from_numpy(got[pid][1][image_id][3]), torch.from_numpy(crops), atol=1e-5)


def test_a_changed_image_is_rescored_and_its_pairs_rebuilt(tmp_path):
    folder = tmp_path / "generated"
    write_prompt_folder(folder, n=3)
    db, small = (
        tmp_path / "tipai.db",
        ["--data.init_args.data_root", str(folder), "--model.init_args.methods", "[crops]"],
    )
    _run(FOLDER, tmp_path / "logs", db, *small)
    shutil.copy(folder / "prompt_001_2.png", folder / "prompt_000_1.png")  # same name, other picture
    (folder / "prompt_001_3.png").unlink()
    again = _run(FOLDER, tmp_path / "logs", db, *small)["tipai"]
    assert {
        k: again["counts"][k]
        for k in ("images_scored", "images_rescored", "images_from_database", "prompts_scored", "prompts_from_database")
    } == {
        "images_scored": 0,
        "images_rescored": 1,
        "images_from_database": 10,
        "prompts_scored": 2,
        "prompts_from_database": 1,
    }
    prompts = json.loads((folder / "prompts.json").read_text())
    (folder / "prompts.json").write_text(json.dumps({**prompts, "prompt_002": "a blue square"}))  # all 4 re-scored
    third = _run(FOLDER, tmp_path / "logs", db, *small)["tipai"]["counts"]
    assert (third["images_rescored"], third["images_from_database"], third["prompts_from_database"]) == (4, 7, 2)
    # what a new database of the changed folder holds, pairs included
    _run(FOLDER, tmp_path / "logs", tmp_path / "fresh.db", *small)
    _assert_same_scores(_stored(db), _stored(tmp_path / "fresh.db"))


def test_a_second_folder_gets_its_own_prompt_ids_or_is_refused(tmp_path):
    first, db, small = tmp_path / "first", tmp_path / "tipai.db", ["--model.init_args.methods", "[crops]"]
    write_prompt_folder(first, n=1)
    _run(FOLDER, tmp_path / "logs", db, "--data.init_args.data_root", str(first), *small)
    same_names = tmp_path / "same_names"
    write_prompt_folder(same_names, n=1, seed=8)  # prompt_000 again, other pictures
    with pytest.raises(
        SystemExit,
        match=re.escape(
            f"{db}: prompt 'prompt_000' was scored from {first}; this run reads "
            f"it from {same_names}. A database holds each prompt id from one "
            "folder"
        ),
    ):
        _run(FOLDER, tmp_path / "logs", db, "--data.init_args.data_root", str(same_names), *small)
    other_ids = tmp_path / "other_ids"
    other_ids.mkdir()
    (other_ids / "prompts.json").write_text(json.dumps({"cat": "a red circle"}))
    for s in range(2):
        shutil.copy(same_names / f"prompt_000_{s}.png", other_ids / f"cat_{s}.png")
    _run(FOLDER, tmp_path / "logs", db, "--data.init_args.data_root", str(other_ids), *small)
    with FaithfulnessDatabase(db, readonly=True) as stored:
        assert stored.roots() == sorted([str(first), str(other_ids)])
        assert [pid for pid, _ in stored.prompts()] == ["cat", "prompt_000"]
        assert stored.images("prompt_000")[0].path == str(first / "prompt_000_0.png")
        assert stored.images("cat")[1].path == str(other_ids / "cat_1.png")


def test_file_names_that_cannot_be_written_are_refused_before_anything_is(tmp_path):
    folder = tmp_path / "generated"
    write_prompt_folder(folder, n=1)
    (folder / "prompt_000_99999999999999999999.png").write_bytes((folder / "prompt_000_0.png").read_bytes())
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{folder / 'prompt_000_99999999999999999999.png'}: seed 99999999999999999999 does not fit a 64-bit integer"
        ),
    ):
        PromptFolder(folder, 64)
    (folder / "prompt_000_99999999999999999999.png").unlink()
    long_id = "p" * 250  # its figure val_<id>.png would be 258 bytes: over the file system's 255
    (folder / "prompts.json").write_text(json.dumps({"prompt_000": "a red circle", long_id: "a blue square"}))
    message = re.escape(
        f"{folder / 'prompts.json'}: prompt id '{'p' * 40}...{'p' * 10}' is 250 bytes long (UTF-8), "
        "over the limit of 200"
    )
    with pytest.raises(ValueError, match=message):
        PromptFolder(folder, 64)
    with pytest.raises(SystemExit, match=message):
        _run(FOLDER, tmp_path / "logs", tmp_path / "tipai.db", "--data.init_args.data_root", str(folder))
    assert not (tmp_path / "tipai.db").exists() and not list(tmp_path.glob("logs/**/*.png"))
    for bad in ("a\nb", "..", ""):
        with pytest.raises(ValueError, match="prompt id"):
            check_prompt_id(bad, "prompts.json")


@pytest.mark.slow  # two Lightning processes: ~1-3 min on 2 cores
def test_two_processes_give_the_single_process_numbers_and_database(shapes_run, tmp_path):
    root, single = shapes_run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    db = tmp_path / "ddp.db"
    # 3 prompts in batches of 2 (as the single run): whole batches per process (BatchAlignedSampler),
    # so every batch, and every number, is the single process's
    cmd = [
        sys.executable,
        "-m",
        "xclip.cli",
        "validate",
        "--config",
        str(SHAPES),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--model.init_args.db_path",
        str(db),
        *SMALL,
        "--data.init_args.n",
        "3",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
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
    one-sided binomial test (docs/workflows/faithfulness.md: 0.150 vs 0.045 on 100 prompts)."""
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
    _run(
        SHAPES,
        tmp_path / "logs",
        db,
        "--data.init_args.n",
        "2",
        "--model.init_args.methods",
        "[dense]",
        "--model.init_args.head",
        str(path),
    )
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
