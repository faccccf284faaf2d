"""Retrieval configs: the ShapesWorld config runs through `xclip validate`, two DDP processes (CPU,
gloo) give exactly the single-process numbers and embeddings, and the COCO config parses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from xclip.cli import main
from xclip.engine.lightning_cli import XClipCLI
from xclip.retrieval import RetrievalDataModule, RetrievalModule

ROOT = Path(__file__).resolve().parents[2]
SHAPES, COCO = ROOT / "configs" / "retrieval_shapes.yaml", ROOT / "configs" / "retrieval_coco.yaml"
# 45 images (odd: the distributed sampler pads one rank with a repeat), 3 captions each
SMALL = [
    "--data.init_args.n",
    "45",
    "--data.init_args.captions_per_image",
    "3",
    "--data.init_args.batch_size",
    "8",
    "--trainer.enable_progress_bar",
    "false",
]


def outputs(run_root: Path) -> tuple[dict, dict, dict]:
    """results.json, the cache's meta.json and its tensors of the one run under `run_root`."""
    results = json.loads(next((run_root / "logs").glob("*/version_*/results.json")).read_text())
    entry = Path(results["retrieval"]["embedding_cache"]["dir"])
    return results, json.loads((entry / "meta.json").read_text()), load_file(entry / "embeddings.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    main(
        [
            "validate",
            "--config",
            str(SHAPES),
            "--trainer.logger.init_args.save_dir",
            str(root / "logs"),
            "--model.init_args.cache_dir",
            str(root / "cache"),
            *SMALL,
        ]
    )
    return outputs(root)


def test_shapes_config_writes_results_and_cache(single):
    results, meta, tensors = single
    metrics, recall = results["metrics"], results["retrieval"]["recall"]
    for direction in ("t2i", "i2t"):
        for k in (1, 5, 10):
            assert metrics[f"val/retrieval/{direction}_R@{k}"] == pytest.approx(
                recall[f"val/retrieval/{direction}_R@{k}"], abs=1e-6
            )
    # brute force from the cached embeddings: rank every image for every caption (ties by index)
    sim = tensors["text_emb"] @ tensors["image_emb"].T
    owner = tensors["text_to_image"]
    for k in (1, 5, 10):
        t2i = (sim.topk(k, dim=1).indices == owner[:, None]).any(1).double().mean().item()
        i2t = (
            sum(
                bool(set(sim.T[i].topk(k).indices.tolist()) & set((owner == i).nonzero().flatten().tolist()))
                for i in range(45)
            )
            / 45
        )
        assert recall[f"val/retrieval/t2i_R@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert recall[f"val/retrieval/i2t_R@{k}"] == pytest.approx(i2t, abs=1e-6)
    assert recall["val/retrieval/t2i_R@1"] > 0.5  # the shipped checkpoint, not chance (1/45)
    assert results["retrieval"]["n_images"] == 45 and results["retrieval"]["n_captions"] == 135
    assert results["retrieval"]["embedding_cache"]["status"] == "miss; written"
    assert meta["image_keys"] == [f"shapes:1000:{i}" for i in range(45)]
    assert meta["text_to_image"] == [i for i in range(45) for _ in range(3)]
    assert tensors["image_emb"].shape == (45, 128) and tensors["text_emb"].shape == (135, 128)


@pytest.mark.slow  # CI runs tests/test_ddp.py, which compares the demo suite's retrieval numbers the same way
def test_ddp_two_processes_equal_single_process(single, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    cmd = [
        sys.executable,
        "-m",
        "xclip.cli",
        "validate",
        "--config",
        str(SHAPES),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--model.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        *SMALL,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, meta, tensors = outputs(tmp_path)
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # a second process really ran
    assert results["retrieval"]["recall"] == single[0]["retrieval"]["recall"]  # exact fractions
    assert results["metrics"] == single[0]["metrics"]
    assert results["retrieval"]["n_images"] == 45 and results["retrieval"]["n_captions"] == 135  # repeat dropped
    assert {k: meta[k] for k in ("key", "image_keys", "captions", "text_to_image")} == {
        k: single[1][k] for k in ("key", "image_keys", "captions", "text_to_image")
    }
    for name in ("image_emb", "text_emb"):
        torch.testing.assert_close(tensors[name], single[2][name], atol=1e-5, rtol=0)
    assert torch.equal(tensors["text_to_image"], single[2]["text_to_image"])


def test_coco_config_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/coco does not exist here
    cli = XClipCLI(run=False, args=["--config", str(COCO), "--model.init_args.backbone", "xclip:tiny-shapes"])
    data, model = cli.datamodule, cli.model
    assert isinstance(data, RetrievalDataModule) and isinstance(model, RetrievalModule)
    assert (data.source, data.data_root, data.n, data.image_size) == ("coco", "data/coco", 5000, 224)
    assert model.cache_dir == "runs/embedding_cache" and model.ks == (1, 5, 10)
    spec = cli.config["model"]["init_args"]["backbone"]
    assert spec == "xclip:tiny-shapes"  # overridden above; the file's own spec must be a real pretrained tag
    file_spec = [line.split(":", 1)[1].strip() for line in COCO.read_text().splitlines() if "backbone:" in line][0]
    arch, tag = file_spec.removeprefix("openclip:").split("/")
    assert (arch, tag) in open_clip.list_pretrained()
    with pytest.raises(FileNotFoundError, match=r"data/coco/annotations/captions_val2017\.json"):
        data.setup("validate")
