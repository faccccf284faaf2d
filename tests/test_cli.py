"""The `xclip` CLI: the demo writes results.json, TensorBoard scalars and explanation images;
bad configs and missing paths fail with clear messages."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xclip.cli import main

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def small_demo(tmp_path: Path, backbone: str | None = None) -> str:
    """configs/demo.yaml with every data set shrunk to a few batches (and, optionally, every
    member's backbone replaced)."""
    cfg = yaml.safe_load(Path(DEMO).read_text())
    sizes = {"n_val": 40, "n": 40, "n_id": 40, "n_ood": 40, "n_calib": 20, "batch_size": 20}
    for dm in cfg["data"]["init_args"]["datamodules"].values():
        dm["init_args"].update({k: v for k, v in sizes.items() if k in dm["init_args"]})
    if backbone is not None:
        for member in cfg["model"]["init_args"]["modules"].values():
            member["init_args"]["backbone"] = backbone
    path = tmp_path / "demo_small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_demo(tmp_path, *extra):
    main(["validate", "--config", small_demo(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false", *extra])
    runs = sorted((tmp_path / "demo").glob("version_*"))
    assert runs, f"no run directory under {tmp_path}"
    return runs[-1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"))


def test_demo_writes_results_json_with_metrics_and_config(demo_run, capsys):
    results = json.loads((demo_run / "results.json").read_text())
    metrics = results["metrics"]
    for key in ("val/zeroshot_shape_acc", "val/zeroshot_colour_acc", "val/t2i_R@1", "val/i2t_R@5"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # the run evaluated the shipped checkpoint, not a random model: well above chance (1/6) on
    # 40 images (the floors themselves are measured in test_tiny_checkpoint.py)
    assert metrics["val/zeroshot_shape_acc"] > 0.3 and metrics["val/zeroshot_colour_acc"] > 0.9
    assert results["stage"] == "validate"
    assert results["zeroshot"]["backbone"] == "xclip:tiny-shapes"
    members = results["config"]["model"]["init_args"]["modules"]
    assert {m["init_args"]["backbone"] for m in members.values()} == {"xclip:tiny-shapes"}


def test_demo_evaluates_retrieval_and_ood_in_the_same_run(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    metrics = results["metrics"]
    assert results["routes"] == {"classification": "zeroshot", "retrieval": "retrieval", "ood": "ood"}
    assert results["retrieval"]["retrieval"]["n_images"] == 40
    assert results["retrieval"]["retrieval"]["n_captions"] == 80
    # background-only images are far from both ID classes for the shipped checkpoint
    assert metrics["val/ood_background/neglabel/auroc"] > 0.9
    for split in ("ood_background", "ood_novel_shape"):
        for variant in ("neglabel", "neglabel_star", "negalign"):
            assert 0.0 <= metrics[f"val/{split}/{variant}/fpr95"] <= 1.0
    assert (demo_run / "val_lambda_sweep.png").is_file() and (demo_run / "neg_labels_noun.txt").is_file()


def test_demo_logs_scalars_and_explanation_images_to_tensorboard(demo_run):
    events = list(demo_run.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(demo_run), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "val/zeroshot_shape_acc" in tags["scalars"]
    image_tags = [t for t in tags["images"] if t.startswith("explain/grad_eclip/")]
    assert len(image_tags) >= 8, tags["images"]  # 8 overlays + token charts
    assert any(t.endswith("/tokens") for t in image_tags)


def test_demo_writes_explanation_files(demo_run):
    out = demo_run / "explanations" / "grad_eclip"
    index = json.loads((out / "val_index.json").read_text())
    assert len(index["items"]) == 8
    item = index["items"][0]
    assert (out / item["png"]).is_file() and (out / item["token_png"]).is_file()
    raw = np.load(out / item["npy"])
    side = json.loads((out / item["npy"]).with_suffix(".json").read_text())
    assert raw.shape == (8, 8) and side["image_size"] == [64, 64]  # patch grid, not upsampled
    assert item["words"] and abs(sum(s for _, s in item["words"]) - 1.0) < 1e-4 or item["all_zero"]


def test_malformed_config_is_rejected_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: xclip.clip.ZeroShotModule\n  init_args:\n    bakcbone: xclip:tiny-shapes\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--config", str(bad)])
    assert exc.value.code != 0
    assert "bakcbone" in capsys.readouterr().err


def test_missing_checkpoint_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises((FileNotFoundError, SystemExit, ValueError)) as exc:
        main(["validate", "--config", small_demo(tmp_path, backbone=str(missing)),
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    shown = str(exc.value) + capsys.readouterr().err  # jsonargparse reports on stderr
    assert f"{missing}': no such file or directory" in shown
