"""The Teacher/Student workflow end to end through `xclip`: fit a tiny teacher (best checkpoint by
mean macro F1, exported), resume it, validate the saved checkpoint with the SHAP and Captum
callbacks (images read back from the TensorBoard event file), train students with and without
KD (the projection layer is in the optimiser and changes), and two processes give the numbers of
one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from distill_fixtures import STUDENT_ARGS, TASKS, TEACHER_ARGS, shapes_csv_layout
from PIL import Image
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xclip.cli import main
from xclip.distill import DistillDataModule, StudentModule, TeacherModule, label_fingerprint, load_classifier

ROOT = Path(__file__).resolve().parents[2]
TEACHER_CONFIG = ROOT / "configs" / "distill_teacher_shapes.yaml"
EXPLAIN_CONFIG = ROOT / "configs" / "distill_explain_shapes.yaml"


def small_config(tmp_path: Path, source: Path, name: str, model_args: dict | None = None, **init_args) -> Path:
    """`source` with a tiny architecture, tiny data and no export to checkpoints/."""
    cfg = yaml.safe_load(source.read_text())
    cfg["trainer"].update(
        {
            "max_steps": 3,
            "val_check_interval": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        }
    )
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    for callback in cfg["trainer"]["callbacks"]:
        if "every_n_train_steps" in callback.get("init_args", {}):
            callback["init_args"]["every_n_train_steps"] = 1
    cfg["data"]["init_args"].update({"n_train": 24, "n_val": 7, "n_test": 5, "batch_size": 4})
    args = cfg["model"]["init_args"]
    if model_args is not None:
        args["model"] = model_args
        args.pop("init_from", None)
        args["frozen"] = []
    args.update(init_args)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = small_config(tmp, TEACHER_CONFIG, "teacher", TEACHER_ARGS)
    main(["fit", "--config", str(cfg)])
    (run,) = sorted((tmp / "logs" / "distill_teacher_shapes").glob("version_*"))
    return tmp, cfg, run


def test_fit_keeps_the_best_checkpoint_by_mean_macro_f1_and_exports_it(teacher_run):
    tmp, _, run = teacher_run
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (run / "checkpoints" / "latest-step=3.ckpt").is_file()
    ckpt = torch.load(best[0], map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["monitor"] == "val/distill/mean_macro_f1" and ckpt["xclip_distill"]["labels"] == TASKS
    assert ckpt["xclip_distill"]["label_fingerprint"] == label_fingerprint(TASKS)
    restored = TeacherModule.load_from_checkpoint(best[0], map_location="cpu")  # Lightning's own (safe) load
    assert restored.model.tasks == TASKS
    torch.testing.assert_close(
        restored.model.state_dict(),
        {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")},
    )
    # three validations (one per step): the kept one is the step with the highest mean macro F1
    events = EventAccumulator(str(run)).Reload()
    logged = {e.step: e.value for e in events.Scalars("val/distill/mean_macro_f1")}
    assert len(logged) == 3
    assert float(state["best_model_score"]) == pytest.approx(max(logged.values()))
    assert ckpt["global_step"] in [s for s, v in logged.items() if v == pytest.approx(max(logged.values()))]
    model, tokenizer, config = load_classifier(run / "model")  # exported into the run's log directory
    assert config["role"] == "teacher" and config["best_checkpoint"] == str(best[0])
    assert config["label_fingerprint"] == label_fingerprint(TASKS) and config["label_order_checked"]
    with safe_open(str(run / "model" / "model.safetensors"), framework="pt") as weights:
        assert json.loads(weights.metadata()["xclip_labels"]) == TASKS
    for key, value in model.state_dict().items():  # the export holds the best checkpoint's weights (fp16)
        torch.testing.assert_close(value, ckpt["state_dict"][f"model.{key}"].half().to(value.dtype))
    assert tokenizer.get_vocab() == load_classifier(run / "model")[1].get_vocab()


SHIPPED = [ROOT / "checkpoints" / name for name in ("distill-teacher-shapes", "distill-student-shapes", "tiny-shapes")]


def digests(folders: list[Path]) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.iterdir()) if p.is_file()
    }


@pytest.mark.parametrize(
    "recipe", ["distill_teacher_shapes.yaml", "distill_student_shapes.yaml", "distill_student_nokd_shapes.yaml"]
)
def test_a_short_fit_of_every_recipe_leaves_the_shipped_weights_unchanged(recipe, tmp_path):
    before = digests(SHIPPED)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / recipe),
            "--trainer.max_steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.n_val",
            "4",
        ]
    )
    assert digests(SHIPPED) == before
    (run,) = tmp_path.glob("*/version_0")
    assert load_classifier(run / "model")[2]["role"].split()[0] in ("teacher", "student")  # exported into the run


def test_exporting_over_a_folder_needs_overwrite_and_is_checked_before_training(teacher_run, tmp_path):
    _, cfg, _ = teacher_run
    target = tmp_path / "copy"
    shutil.copytree(SHIPPED[0], target)
    before = digests([target])
    args = [
        "fit",
        "--config",
        str(cfg),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--model.init_args.export_dir",
        str(target),
    ]
    with pytest.raises(SystemExit, match=r"already exists.*overwrite: true"):
        main(args)
    assert digests([target]) == before and not list((tmp_path / "runs").rglob("*.ckpt"))  # no step was taken
    main([*args, "--model.init_args.overwrite", "true"])
    after = digests([target])
    assert after[str(target / "model.safetensors")] != before[str(target / "model.safetensors")]
    assert after[str(target / "README.md")] == before[str(target / "README.md")]  # the model card is carried over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "runs"]  # no backup or temp left


def test_fit_resumes_from_the_last_checkpoint(teacher_run, tmp_path):
    _, cfg, run = teacher_run
    main(
        [
            "fit",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(run / "checkpoints" / "latest-step=3.ckpt"),
            "--trainer.max_steps",
            "5",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--model.init_args.export",
            "false",
        ]
    )
    (resumed,) = sorted((tmp_path / "distill_teacher_shapes").glob("version_*"))
    last = torch.load(resumed / "checkpoints" / "latest-step=5.ckpt", map_location="cpu", weights_only=False)
    first = torch.load(run / "checkpoints" / "latest-step=3.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 3 and last["global_step"] == 5  # continued, not restarted
    assert last["optimizer_states"][0]["state"]  # AdamW moments restored and carried on


def test_validate_a_saved_checkpoint_with_shap_and_captum_callbacks(teacher_run, tmp_path):
    _, _, run = teacher_run
    (best,) = sorted((run / "checkpoints").glob("best-*.ckpt"))
    cfg = yaml.safe_load(EXPLAIN_CONFIG.read_text())
    args = cfg["model"]["init_args"]
    args.pop("init_from")
    args.update({"model": TEACHER_ARGS, "frozen": []})
    cfg["model"]["class_path"] = "xclip.distill.TeacherModule"  # the fit's module, restored from its checkpoint
    cfg["data"]["init_args"].update({"n_val": 7, "n_test": 5, "batch_size": 4})
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["trainer"]["enable_progress_bar"] = False
    for cb in cfg["trainer"]["callbacks"]:
        cb["init_args"].update({"max_items": 2})
        if cb["class_path"].endswith("SHAPCallback"):
            cb["init_args"].update({"background_size": 3, "nsamples": 8})
        else:
            cb["init_args"].update({"n_steps": 8, "internal_batch_size": 6})
    path = tmp_path / "explain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["validate", "--config", str(path), "--ckpt_path", str(best)])
    (out,) = sorted((tmp_path / cfg["trainer"]["logger"]["init_args"]["name"]).glob("version_*"))
    results = json.loads((out / "results.json").read_text())
    assert results["distill"]["n_items"] == 7 and results["distill"]["role"] == "teacher"
    assert set(results["metrics"]) >= {
        "val/distill/mean_macro_f1",
        "val/distill/shape_macro_f1",
        "val/distill/background_auroc",
    }
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    tags = set(events.Tags()["images"])
    for explainer in ("shap", "integrated_gradients"):
        for task in ("shape", "background"):
            for item in ("0", "1"):
                tag = f"val/explanations/{explainer}/{task}_{item}"
                assert tag in tags and f"{tag}_tokens" in tags, tag
                image = events.Images(tag)[0]
                assert image.width > 300 and image.height > 150  # a rendered panel, not an empty image
        index = json.loads((out / "explanations" / explainer / "val" / "index.json").read_text())
        assert len(index["items"]) == 4
        record = index["items"][0]
        assert set(record["totals"]) == {"image", "text", "image_abs", "text_abs", "image_share"}
        assert record["words"] and all(not w.startswith("##") for w, _ in record["words"])
        assert record["path"] is None and record["item_id"] == str(record["index"])  # generated: named by index
        png = Image.open(out / "explanations" / explainer / "val" / record["png"])
        assert record["text"] in png.text["Title"].replace("\n", " ") or record["text"][:20] in png.text["Title"]
        paths = {"shap": {"joint"}, "integrated_gradients": {"image", "text"}}[explainer]
        assert set(record["deltas"]) == paths
    shap_index = json.loads((out / "explanations" / "shap" / "val" / "index.json").read_text())
    assert shap_index["settings"]["background_size"] == 3 and shap_index["settings"]["nsamples"] == 8


def test_validate_a_checkpoint_on_a_small_csv(teacher_run, tmp_path, capsys):
    """The checkpoint's classes (ShapesWorld's order) replace those of the CSV's training split
    (sorted) the model was first built with; the dev split holds one shape only: its AUROC is
    undefined (null, with a note), never 0; every report row says how many items it scored; and
    torchmetrics has nothing to warn about although most classes are absent from 6 items."""
    _, cfg, run = teacher_run
    (best,) = sorted((run / "checkpoints").glob("best-*.ckpt"))
    root = shapes_csv_layout(tmp_path / "data")
    for split in ("train", "dev", "test"):
        path = root / f"metadata_{split}.csv"
        lines = path.read_text().splitlines()
        lines[0] = lines[0].replace("type", "shape").replace("severity", "background")
        if split == "dev":  # every dev item a circle
            lines[1:] = [",".join([ln.split(",")[0], "circle", *ln.split(",", 2)[2:]]) for ln in lines[1:]]
        path.write_text("\n".join(lines) + "\n")
    config = yaml.safe_load(cfg.read_text())
    config["data"]["init_args"] = {
        "source": "csv",
        "data_root": str(root),
        "label_columns": ["shape", "background"],
        "image_size": 64,
        "batch_size": 4,
    }
    path = tmp_path / "csv.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "validate",
                "--config",
                str(path),
                "--ckpt_path",
                str(best),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "logs"),
            ]
        )
    assert not [str(w.message) for w in caught if "torchmetrics" in w.filename]
    results = json.loads(next((tmp_path / "logs").glob("*/version_*/results.json")).read_text())
    assert results["distill"]["tasks"] == TASKS and results["distill"]["n_items"] == 6
    assert (
        results["metrics"]["val/distill/shape_auroc"] is None
        and results["metrics"]["val/distill/shape_acc"] is not None
    )
    note = "undefined: all 6 evaluated items are 'circle'; one-vs-rest AUROC needs items of two classes or more"
    assert results["distill"]["notes"] == {"val/distill/shape_auroc": note}
    report = capsys.readouterr().out
    assert f"shape (val, n=6): macro F1 | accuracy | OvR AUROC (AUROC {note})" in report
    assert "background (val, n=6): macro F1 | accuracy | OvR AUROC " in report
    assert "mean macro F1 over tasks (val, n=6)" in report


@pytest.mark.parametrize("alpha,beta", [(1.0, 100.0), (0.0, 0.0)])
def test_student_trains_its_projection_with_one_optimiser_and_a_frozen_teacher(teacher_run, tmp_path, alpha, beta):
    _, _, run = teacher_run
    student = StudentModule(
        teacher=str(run / "model"), model=STUDENT_ARGS, alpha=alpha, beta=beta, lr=1e-2, warmup_steps=0
    )
    teacher_before = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    projection_before = None if student.kd_projection is None else student.kd_projection.weight.detach().clone()
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(student, datamodule=DistillDataModule(n_train=8, batch_size=4))
    (optimizer,) = trainer.optimizers  # one optimiser for the whole run
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(
        not torch.is_tensor(v) or torch.equal(v, teacher_before[k]) for k, v in student.teacher.state_dict().items()
    )
    assert not any(k.startswith("teacher.") for k in student.state_dict())
    if beta > 0:
        assert all(id(p) in in_optimizer for p in student.kd_projection.parameters())
        assert not torch.equal(student.kd_projection.weight, projection_before)  # it was trained
        assert trainer.callback_metrics["train/kd"] > 0 and trainer.callback_metrics["train/mse"] > 0
    else:
        assert student.kd_projection is None and student.role == "student (no KD)"
        assert trainer.callback_metrics["train/kd"] == 0


@pytest.mark.slow  # the suite's budget; the metric's de-duplication by item is unit-tested in test_distill.py
def test_two_processes_give_the_numbers_of_one(teacher_run, tmp_path):
    _, cfg, run = teacher_run
    (best,) = sorted((run / "checkpoints").glob("best-*.ckpt"))
    args = ["validate", "--config", str(cfg), "--ckpt_path", str(best), "--data.init_args.n_val", "7"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process below: the same kernels, so the same floating-point sums
    try:
        main([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "one")])  # in this process
    finally:
        torch.set_num_threads(threads)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MASTER_PORT", None)
    cmd = [
        sys.executable,
        "-m",
        "xclip.cli",
        *args,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "two"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads(next((tmp_path / d).glob("*/version_*/results.json")).read_text()) for d in ("one", "two"))
    assert str(two["config"]["trainer"]["devices"]) == "2"
    assert one["distill"]["n_items"] == two["distill"]["n_items"] == 7  # whole batches per process: 4 + 3
    for key, value in one["metrics"].items():
        if key != "val/distill/loss":  # Lightning syncs a logged loss as the mean of per-process means
            assert two["metrics"][key] == value, key
