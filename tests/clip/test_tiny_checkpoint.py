"""The shipped tiny CLIP understands ShapesWorld: the model card's floors, measured on held-out
images that training never saw (seed 2000; training used the pretrain stream of seed 0)."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from xclip.backbones import load_backbone
from xclip.clip import ZeroShotModule
from xclip.data import ShapesWorldDataModule

CARD = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-shapes"


def validate(task: str, n: int) -> dict[str, float]:
    module = ZeroShotModule("xclip:tiny-shapes")
    data = ShapesWorldDataModule(val_tasks=[task], seed=1000, n_val=n, batch_size=250)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return {
        k.rsplit("/", 1)[1]: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()
    }


def test_checkpoint_is_small_and_described():
    files = {p.name: p.stat().st_size for p in CARD.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert sum(files.values()) < 30 * 2**20
    config = json.loads((CARD / "config.json").read_text())
    assert config["architecture"] == "openclip" and config["tokenizer"]["context_length"] == 32
    backbone = load_backbone("xclip:tiny-shapes")
    assert backbone.grid_size == (8, 8) and backbone.image_size == 64


@pytest.fixture(scope="module")
def classification_metrics():
    return validate("classification", 400)


def test_zero_shot_colour_accuracy_floor(classification_metrics):
    assert classification_metrics["colour_acc"] >= 0.90, classification_metrics


def test_zero_shot_shape_accuracy_floor(classification_metrics):
    assert classification_metrics["shape_acc"] >= 0.90, classification_metrics


def test_zero_shot_shape_accuracy_is_above_chance(classification_metrics):
    # what the shipped checkpoint does reach (chance is 1/6): guards against regressions
    assert classification_metrics["shape_acc"] >= 0.40, classification_metrics


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_retrieval_recall_at_5_floor_on_1000_images(direction, retrieval_metrics):
    assert retrieval_metrics[f"{direction}_R@5"] >= 0.80, retrieval_metrics


@pytest.fixture(scope="module")
def retrieval_metrics():
    return validate("retrieval", 1000)
