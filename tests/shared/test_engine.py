"""The contract written once: the warm-up + cosine schedule, the one model-folder format (every
shipped folder reads through it unchanged), the evaluation base's hooks and key scheme."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from xclip.engine import EvaluationModule, ReportsResults, warmup_cosine
from xclip.model_folder import FORMAT_VERSION, read_config, read_folder, save_folder

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {
    "tiny-shapes": "openclip",
    "searle-phi-tiny-shapes": "searle-phi",
    "tspo-head-tiny-shapes": "tspo-head",
    "distill-teacher-shapes": "xclip-distill-classifier",
    "distill-student-shapes": "xclip-distill-classifier",
}


def test_warmup_cosine_by_hand():
    # 10 steps, 4 warm-up steps: (s+1)/4 for s < 4, then 0.5 (1 + cos(pi (s-4)/6))
    got = [warmup_cosine(s, 10, 4) for s in range(11)]
    want = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 11)]
    assert got == pytest.approx(want)
    assert warmup_cosine(0, 10, 0) == 1.0 and warmup_cosine(10, 10, 0) == pytest.approx(0.0)
    assert warmup_cosine(0, 4, 100) == 0.5  # warm-up capped at half the steps


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_folder_reads_through_the_one_format(name):
    folder = ROOT / "checkpoints" / name
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    model = read_folder(folder, SHIPPED[name])
    assert model.architecture == SHIPPED[name] and model.config["format_version"] == 1
    assert all(t.dtype != torch.float16 for t in model.tensors.values())  # floating weights read as fp32
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == digest


def test_save_folder_round_trip_overwrite_rule_and_card(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([1, 2])}
    path = save_folder(tmp_path / "m", "toy", {"width": 3}, tensors, card="# toy\n", dtype=torch.float16)
    config = json.loads((path / "config.json").read_text())
    assert list(config)[:2] == ["architecture", "format_version"] and config["format_version"] == FORMAT_VERSION
    model = read_folder(path, "toy")
    assert torch.equal(model.tensors["w"], tensors["w"]) and model.tensors["n"].dtype == torch.int64
    (path / "README.md").write_text("# my own card\n")
    with pytest.raises(FileExistsError, match="already holds a model"):
        save_folder(path, "toy", {"width": 3}, tensors)
    save_folder(path, "toy", {"width": 4}, tensors, card="# generated\n", overwrite=True)
    assert (path / "README.md").read_text() == "# my own card\n"  # a card already there is kept
    assert read_config(path, "toy")["width"] == 4
    with pytest.raises(ValueError, match=r"config.json: architecture 'toy', expected 'openclip'"):
        read_config(path, "openclip")
    (path / "config.json").write_text(json.dumps({"architecture": "toy", "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="newer than this xclip reads"):
        read_config(path, "toy")


class _Toy(EvaluationModule):
    workflow, tasks = "toy", ("classification",)

    def __init__(self, width: int = 3, backbone: object = "xclip:tiny-shapes"):
        super().__init__()
        self.seen: list[str] = []

    def start(self, stage):
        self.seen.append(f"start {stage}")

    def step(self, batch, stage):
        self.seen.append(f"step {stage}")
        return {"n": len(batch["image"])}

    def finish(self, stage):
        self.seen.append(f"finish {stage}")


def test_evaluation_base_hooks_keys_and_hyperparameters():
    toy = _Toy(width=5, backbone=torch.nn.Linear(1, 1))
    path = f"{__name__}._Toy"  # how LightningCLI re-applies a checkpoint's hyperparameters
    assert dict(toy.hparams) == {"_class_path": path, "width": 5}  # model objects are not hyperparameters
    assert dict(_Toy(width=2).hparams) == {"_class_path": path, "width": 2, "backbone": "xclip:tiny-shapes"}
    assert isinstance(toy, ReportsResults)
    toy.on_validation_epoch_start()
    assert toy.validation_step({"task": "classification", "image": [1, 2]}, 0) == {"n": 2}
    toy.on_validation_epoch_end()
    toy.on_test_epoch_start()
    toy.test_step({"task": "classification", "image": [1]}, 0)
    toy.on_test_epoch_end()
    assert toy.seen == ["start val", "step val", "finish val", "start test", "step test", "finish test"]
    assert toy.metric_key("val", "acc") == "val/toy/acc"
    with pytest.raises(ValueError, match=r"_Toy evaluates batches of task 'classification', got 'ood'"):
        toy.validation_step({"task": "ood"}, 0)
