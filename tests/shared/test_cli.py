"""The `xclip` CLI: the demo writes results.json, TensorBoard scalars and explanation images;
bad configs and missing paths fail with clear messages."""

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xclip.cli import main

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")


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
    """Run the shrunk demo; returns (run directory, what it printed on stdout)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(
            [
                "validate",
                "--config",
                small_demo(tmp_path),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
                "--trainer.enable_progress_bar",
                "false",
                *extra,
            ]
        )
    runs = sorted((tmp_path / "demo").glob("version_*"))
    assert runs, f"no run directory under {tmp_path}"
    return runs[-1], printed.getvalue()


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_run(demo_output):
    return demo_output[0]


@pytest.fixture(scope="module")
def direct(demo_run):
    """The demo's numbers computed without xclip's modules: encode every held-out image and text
    of the shrunk demo with the tiny backbone and score them by hand."""
    import torch
    import torch.nn.functional as F

    from xclip.backbones import load_backbone
    from xclip.clip.zeroshot_module import DEFAULT_CLASSES, DEFAULT_PROMPTS
    from xclip.data import ShapesWorldDataModule
    from xclip.ood import OODDataModule
    from xclip.retrieval import RetrievalDataModule

    bb = load_backbone("xclip:tiny-shapes")
    out = {}
    with torch.no_grad():
        cls = ShapesWorldDataModule(val_tasks=["classification"], n_val=40).dataset("classification", "val")
        items = [cls[i] for i in range(len(cls))]
        img = F.normalize(bb.encode_image(bb.normalize(torch.stack([it["image"] for it in items]))), dim=-1)
        for attr, names in DEFAULT_CLASSES.items():
            prompts = DEFAULT_PROMPTS[attr]
            text = F.normalize(bb.encode_text([t.format(c) for c in names for t in prompts]), dim=-1)
            heads = F.normalize(text.view(len(names), len(prompts), -1).mean(1), dim=-1)
            pred = (img @ heads.T).argmax(1)
            out[f"val/zeroshot/{attr}_acc"] = float((pred == torch.tensor([it[attr] for it in items])).float().mean())
        gallery = RetrievalDataModule(source="shapes", n=40, seed=0).gallery
        g_img = F.normalize(bb.encode_image(bb.normalize(torch.stack([gallery.image(i) for i in range(40)]))), dim=-1)
        texts, owner = gallery.all_captions()
        g_txt = F.normalize(bb.encode_text(texts), dim=-1)
        sim = g_txt @ g_img.T  # brute force: the rank of each caption's own image, ties broken by index
        for k in (1, 5, 10):
            top = sim.topk(k, dim=1).indices
            out[f"val/retrieval/t2i_R@{k}"] = float((top == owner[:, None]).any(1).float().mean())
            hits = [(sim.T[i].topk(k).indices[:, None] == (owner == i).nonzero().flatten()).any() for i in range(40)]
            out[f"val/retrieval/i2t_R@{k}"] = float(torch.stack(hits).float().mean())
        # NegLabel on the OOD sets, with the demo member's negatives (the mined vocabulary is on disk)
        from xclip.ood import NegLabelScorer

        nouns = (demo_run / "neg_labels_noun.txt").read_text().split("\n")
        adjs = (demo_run / "neg_labels_adj.txt").read_text().split("\n")
        neg = torch.cat(
            [
                F.normalize(bb.encode_text([f"the nice {w}" for w in nouns if w]), dim=-1),
                F.normalize(bb.encode_text([f"This is a {w} photo" for w in adjs if w]), dim=-1),
            ]
        )
        ids = F.normalize(bb.encode_text(["the nice square", "the nice circle"]), dim=-1)
        scorer = NegLabelScorer(ids.double(), neg.double(), n_groups=10, seed=0)
        scores = {}
        for name, _, ds in OODDataModule(n_id=40, n_ood=40, n_calib=20).sets("val"):
            x = torch.stack([ds[i]["image"] for i in range(len(ds))])
            scores[name] = scorer(bb.encode_image(bb.normalize(x)).double())
        out["ood"] = scores
    return out


def test_demo_metrics_equal_a_direct_computation(demo_run, direct):
    results = json.loads((demo_run / "results.json").read_text())
    metrics = results["metrics"]
    for key in (
        "val/zeroshot/shape_acc",
        "val/zeroshot/colour_acc",
        *(f"val/retrieval/{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)),
    ):
        assert metrics[key] == pytest.approx(direct[key], abs=1e-6), key
    # the shipped checkpoint, not a random model: well above chance (1/6) on these 40 images
    assert metrics["val/zeroshot/shape_acc"] > 0.3 and metrics["val/zeroshot/colour_acc"] > 0.9
    assert results["stage"] == "validate"
    assert results["zeroshot"]["backbone"] == "xclip:tiny-shapes"
    members = results["config"]["model"]["init_args"]["modules"]
    assert {m["init_args"]["backbone"] for m in members.values()} == {"xclip:tiny-shapes"}


def test_demo_evaluates_retrieval_and_ood_in_the_same_run(demo_run, direct):
    from xclip.metrics import ood_metrics

    results = json.loads((demo_run / "results.json").read_text())
    metrics = results["metrics"]
    assert results["routes"] == {"classification": "zeroshot", "retrieval": "retrieval", "ood": "ood"}
    assert results["retrieval"]["retrieval"]["n_images"] == 40
    assert results["retrieval"]["retrieval"]["n_captions"] == 80
    for split in ("ood_background", "ood_novel_shape"):
        expected = ood_metrics(direct["ood"]["id"], direct["ood"][split])
        for key in ("auroc", "fpr95"):
            assert metrics[f"val/ood/{split}/neglabel/{key}"] == pytest.approx(expected[key], abs=1e-6), (split, key)
        for variant in ("neglabel_star", "negalign"):  # logged = the report in results.json
            for key, value in results["ood"]["ood"]["variants"][variant][split].items():
                assert metrics[f"val/ood/{split}/{variant}/{key}"] == pytest.approx(value, abs=1e-6)
    # background-only images are far from both ID classes for the shipped checkpoint
    assert metrics["val/ood/ood_background/neglabel/auroc"] > 0.9
    assert (demo_run / "val_lambda_sweep.png").is_file() and (demo_run / "neg_labels_noun.txt").is_file()


def test_demo_logs_scalars_and_explanation_images_to_tensorboard(demo_run):
    events = list(demo_run.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(demo_run), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "val/zeroshot/shape_acc" in tags["scalars"]
    image_tags = [t for t in tags["images"] if t.startswith("val/explanations/grad_eclip/")]
    assert len(image_tags) >= 8, tags["images"]  # 8 overlays + token charts
    assert any(t.endswith("_tokens") for t in image_tags)


def test_demo_writes_explanation_files(demo_run):
    out = demo_run / "explanations" / "grad_eclip" / "val"
    index = json.loads((out / "index.json").read_text())
    assert len(index["items"]) == 8
    item = index["items"][0]
    assert (out / item["png"]).is_file() and (out / item["token_png"]).is_file()
    raw = np.load(out / item["npy"])
    side = json.loads((out / item["npy"]).with_suffix(".json").read_text())
    assert raw.shape == (8, 8) and side["image_size"] == [64, 64]  # patch grid, not upsampled
    assert item["words"] and abs(sum(s for _, s in item["words"]) - 1.0) < 1e-4 or item["all_zero"]


def test_demo_prints_one_report_table_with_every_metric_once(demo_output):
    run, printed = demo_output
    results = json.loads((run / "results.json").read_text())
    assert len(re.findall(r"^workflow +\| measured", printed, re.M)) == 1  # one table, not one per dataloader
    assert "DataLoader" not in printed and "Validate metric" not in printed  # Lightning's tables are off
    assert "Tip:" not in printed
    table = printed[re.search(r"^workflow +\| measured", printed, re.M).start() : printed.index("results:")]
    groups = [line.split("|")[0].strip() for line in table.splitlines()[2:] if line.strip() and "-+-" not in line]
    # one block per workflow, in the suite's member order (the shrunk config lists them sorted)
    assert [g for g in groups if g] == ["OOD detection", "image-text retrieval", "zero-shot classification"]
    # every logged metric is shown exactly once, under a full name (never its raw key)
    rows = [line for line in table.splitlines()[2:] if line.strip() and "-+-" not in line]
    shown_values = sum(line.split("|", 2)[2].count("|") + 1 for line in rows)
    assert shown_values == len(results["metrics"]) == 2 + 6 + 4 * 8
    assert not any(key in table for key in results["metrics"])
    assert "NegAlign m3+p_align, lambda 1 (configured) vs ood_novel_shape [val]" in table
    assert "accuracy, shape (6 classes), 40 images [val]" in table
    # then where everything went
    assert f"results:      {run / 'results.json'}" in printed
    assert f"tensorboard --logdir {run}" in printed
    assert f"explanations: {run / 'explanations' / 'grad_eclip' / 'val'}/" in printed
    assert str(run / "val_lambda_sweep.png") in printed


def test_report_lists_unclaimed_metrics_under_their_key():
    from xclip.results import ReportRow, format_report

    metrics = {"val/a": 0.5, "val/b": 0.25, "val/c": 1.0}
    rows = [ReportRow("w1", "first thing", {"": 0.5}, ["val/a"]), ReportRow("w1", "pair", {"x": 0.25}, ["val/b"])]
    text = format_report(rows, metrics)
    assert text.count("0.5000") == 1 and "x 0.2500" in text
    assert "other" in text and "val/c" in text  # unclaimed metrics still appear, once, under their key


def test_explanation_pngs_are_titled_with_the_batch_text(demo_run):
    from PIL import Image

    from xclip.data import ShapesWorldDataModule

    out = demo_run / "explanations" / "grad_eclip" / "val"
    index = json.loads((out / "index.json").read_text())
    dataset = ShapesWorldDataModule(val_tasks=["classification"], n_val=40).dataset("classification", "val")
    for item in index["items"]:
        side = json.loads((out / item["npy"]).with_suffix(".json").read_text())
        caption = dataset[int(item["id"])]["caption"]  # the text of that item in the batch
        assert side["text"] == item["text"] == caption
        assert side["explainer"] == "grad_eclip" and side["item_id"] == item["id"]
        assert side["task"] == "classification" and side["dataloader_idx"] == 0
        title = Image.open(out / item["png"]).text["Title"]
        flat = " ".join(title.split())  # long texts are wrapped over lines
        assert title == side["title"] and f'"{caption}"' in flat and f"item {item['id']}" in title
        assert "grad_eclip" in title and "classification / dl 0" in title
        assert side["max"] == pytest.approx(item["map_max"])


def test_explanation_tensorboard_tags_name_task_and_dataloader(demo_run):
    acc = EventAccumulator(str(demo_run), size_guidance={"images": 0})
    acc.Reload()
    tags = [
        t for t in acc.Tags()["images"] if t.startswith("val/explanations/grad_eclip/") and not t.endswith("_tokens")
    ]
    assert len(tags) == len(set(tags)) == 8
    assert all(t.startswith("val/explanations/grad_eclip/classification_dl0_") for t in tags)


def test_predict_is_not_a_subcommand_and_fit_refuses_an_eval_only_module(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"unknown command 'predict': choose from fit, validate, test, cir-query"):
        main(["predict", "--config", DEMO])
    with pytest.raises(SystemExit, match="EvaluationSuite is evaluation-only"):
        main(["fit", "--config", small_demo(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])


def test_malformed_config_is_rejected_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: xclip.clip.ZeroShotModule\n  init_args:\n    bakcbone: xclip:tiny-shapes\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--config", str(bad)])
    assert exc.value.code != 0
    assert "bakcbone" in capsys.readouterr().err


def test_missing_checkpoint_is_one_paragraph_with_xclips_own_message(tmp_path, capsys):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "validate",
                "--config",
                small_demo(tmp_path, backbone=str(missing)),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
            ]
        )
    message = str(exc.value)
    assert message.startswith(f"xclip: error: FileNotFoundError: '{missing}': no such file or directory")
    assert "expected an xclip checkpoint directory" in message and "--debug" in message
    assert "Union subtypes" not in message and "Traceback" not in message
    assert len(message.splitlines()) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_debug_flag_and_environment_variable_show_the_real_exception(tmp_path, monkeypatch):
    config = small_demo(tmp_path, backbone=str(tmp_path / "missing"))
    with pytest.raises(Exception) as exc:
        main(["validate", "--config", config, "--debug"])
    assert not isinstance(exc.value, SystemExit) and "Union subtypes" in str(exc.value)  # jsonargparse's wrapper
    monkeypatch.setenv("XCLIP_DEBUG", "1")
    with pytest.raises(Exception) as exc:
        main(["validate", "--config", config])
    assert not isinstance(exc.value, SystemExit)


def test_malformed_yaml_names_the_file_and_line_also_among_several_configs(tmp_path):
    bad = tmp_path / "second.yaml"
    bad.write_text("trainer:\n  max_steps: 2\nmodel: [unclosed\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate", "--config", DEMO, "--config", str(bad)])
    assert str(exc.value).startswith(f"xclip: error: config file {bad} is not valid YAML at line 4")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SystemExit, match="list.yaml must hold a mapping"):
        main(["validate", f"--config={tmp_path / 'list.yaml'}"])
    with pytest.raises(SystemExit, match="nope.yaml does not exist"):
        main(["validate", "--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_a_corrupt_checkpoint_file_is_named(tmp_path, damage):
    import shutil

    from xclip.backbones import load_backbone

    copy = tmp_path / "ckpt"
    shutil.copytree(Path(DEMO).parents[1] / "checkpoints" / "tiny-shapes", copy)
    if damage == "config":
        (copy / "config.json").write_text('{"architecture": "openclip", "model_cfg": ')
        with pytest.raises(ValueError, match=rf"{copy / 'config.json'}: not valid JSON"):
            load_backbone(str(copy))
    else:
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 3])  # truncated download
        with pytest.raises(ValueError, match=rf"{copy / 'model.safetensors'}: cannot read the weights"):
            load_backbone(str(copy))
    with pytest.raises(SystemExit, match=rf"xclip: error: ValueError: {copy}"):
        main(
            [
                "validate",
                "--config",
                small_demo(tmp_path, backbone=str(copy)),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
            ]
        )


def _module_at(path: Path, source: str):
    """Import ``source`` from a file at ``path`` (so its frames carry that path)."""
    import importlib.util

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_error_named_comes_from_the_package_not_a_venv_in_a_folder_named_xclip(tmp_path, monkeypatch):
    """A clone named `xclip` holds its venv (`xclip/.venv/...`): a dependency's frames there are not
    xclip's own, and an error raised `from None` does not hand over to its suppressed context."""
    import xclip.backbones.backends.xclip_checkpoint as loading
    import xclip.model_folder as model_folder
    from xclip.backbones import load_backbone
    from xclip.cli import is_own_frame, root_cause

    dependency = _module_at(
        tmp_path / "xclip" / ".venv" / "lib" / "python3.11" / "site-packages" / "fakesafe.py",
        "def load_file(path):\n    raise RuntimeError('incomplete metadata')\n",
    )
    assert not is_own_frame(dependency.__file__)
    assert is_own_frame(loading.__file__)
    monkeypatch.setattr(model_folder, "load_file", dependency.load_file)
    copy = tmp_path / "xclip" / "ckpt"
    import shutil

    shutil.copytree(Path(DEMO).parents[1] / "checkpoints" / "tiny-shapes", copy)
    with pytest.raises(ValueError) as exc:
        load_backbone(str(copy))
    assert isinstance(exc.value.__context__, RuntimeError)  # the dependency's error is still attached
    try:
        raise RuntimeError("a wrapper's message") from exc.value  # how jsonargparse/Lightning wrap it
    except RuntimeError as wrapped:
        cause = root_cause(wrapped)
    assert cause is exc.value
    assert f"{copy / 'model.safetensors'}: cannot read the weights" in str(cause)
    with pytest.raises(SystemExit, match=rf"xclip: error: ValueError: {copy}"):
        main(
            [
                "validate",
                "--config",
                small_demo(tmp_path, backbone=str(copy)),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
            ]
        )


def test_root_cause_honours_raise_from_none():
    from xclip.cli import error_chain

    try:
        try:
            raise KeyError("inner")
        except KeyError:
            raise ValueError("outer") from None
    except ValueError as err:
        assert [type(e) for e in error_chain(err)] == [ValueError]
    try:
        try:
            raise KeyError("inner")
        except KeyError:
            raise ValueError("outer")  # noqa: B904 - the implicit context is what this checks
    except ValueError as err:
        assert [type(e) for e in error_chain(err)] == [ValueError, KeyError]


def test_unknown_named_checkpoint_points_at_the_recipes(monkeypatch):
    from xclip.backbones import load_backbone

    with pytest.raises(FileNotFoundError) as exc:
        load_backbone("xclip:tiny-shape")
    message = str(exc.value)
    assert "did you mean xclip:tiny-shapes?" in message
    assert "configs/pretrain_tiny_shapes*.yaml" in message and "xclip fit" in message
    assert (Path(DEMO).parents[1] / "configs" / "pretrain_tiny_shapes.yaml").is_file()  # where it points exists


def test_help_lists_the_commands_outside_the_lightning_loops(capsys):
    from xclip.cli import COMMANDS

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exc.value.code == 0
    for name in ("fit", "validate", "test", *COMMANDS):
        assert f" {name} " in out
    assert "xclip <command> --help" in out and "--debug" in out


_HELP_WITHOUT_TORCH = """
import sys
from xclip.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
heavy = sorted(m for m in ("torch", "lightning", "gradio", "transformers") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("command", [[], ["cir-query"], ["vocab"], ["app"], ["annotations"]])
def test_help_of_every_command_without_a_model_imports_no_torch(command):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _HELP_WITHOUT_TORCH, *command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "HEAVY []" in done.stdout, done.stdout[-500:]


def test_a_run_that_fails_before_any_result_leaves_no_run_folder(tmp_path, capsys):
    config = Path(DEMO).parents[1] / "configs" / "tipai_folder.yaml"
    with pytest.raises(SystemExit, match="image folder .*missing: no such directory"):
        main(
            [
                "validate",
                "--config",
                str(config),
                "--data.init_args.data_root",
                str(tmp_path / "missing"),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs"),
            ]
        )
    assert not any((tmp_path / "runs").rglob("version_*")), list((tmp_path / "runs").rglob("*"))


def test_discard_failed_run_keeps_a_folder_with_results(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from xclip.results import discard_failed_run

    empty, logged, extra = (tmp_path / name / "version_0" for name in ("empty", "logged", "extra"))
    for run in (empty, logged, extra):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("model: {}")
        with SummaryWriter(str(run)) as writer:
            if run is logged:
                writer.add_scalar("train/loss", 1.0, 0)
    (extra / "results.json").write_text("{}")
    assert [discard_failed_run(run) for run in (empty, logged, extra)] == [True, False, False]
    assert not (tmp_path / "empty").exists() and logged.is_dir() and extra.is_dir()
