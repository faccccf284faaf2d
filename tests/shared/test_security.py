"""Nothing xclip reads runs code from a file: a crafted Lightning checkpoint whose unpickling would
create a directory creates nothing (through `xclip validate --ckpt_path` and through the module's
own code path) and is refused with a message naming the file; no `torch.load` in src/ may unpickle
arbitrary objects."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from distill_fixtures import TEACHER_ARGS

from xclip.cli import main
from xclip.distill import DistillDataModule, TeacherModule

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


class _MakeDirectory:
    """Unpickling this calls os.makedirs(path): the payload of the crafted checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def crafted_checkpoint(path: Path, payload_dir: Path) -> Path:
    """A ~1 KB `.ckpt` shaped like a distill checkpoint whose unpickling creates `payload_dir`."""
    torch.save({"state_dict": {}, "xclip_distill": _MakeDirectory(payload_dir)}, path)
    assert path.stat().st_size < 2048 and not payload_dir.exists()
    return path


def test_the_crafted_checkpoint_is_live(tmp_path):
    # guard: the payload does run when the file is unpickled without restriction
    ckpt = crafted_checkpoint(tmp_path / "crafted.ckpt", tmp_path / "payload")
    torch.load(ckpt, weights_only=False)
    assert (tmp_path / "payload").is_dir()


def test_xclip_validate_refuses_a_crafted_checkpoint_and_runs_nothing(tmp_path):
    payload = tmp_path / "payload"
    ckpt = crafted_checkpoint(tmp_path / "crafted.ckpt", payload)
    with pytest.raises(SystemExit) as err:
        main(
            [
                "validate",
                "--config",
                str(ROOT / "configs" / "distill_teacher_shapes.yaml"),
                "--ckpt_path",
                str(ckpt),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs"),
            ]
        )
    message = str(err.value)
    assert not payload.exists()
    assert str(ckpt) in message and "os.makedirs" in message and "weights_only=True" in message
    assert "weights_only` set to `False` will likely succeed" not in message  # torch's advice is not passed on
    assert not (tmp_path / "runs").exists()


def test_the_module_never_unpickles_the_checkpoint_it_is_restored_from(tmp_path):
    # Trainer.validate with a checkpoint set on the trainer: the module's setup runs before
    # Lightning's own (safe) load; it used to peek at the file with weights_only=False
    payload = tmp_path / "payload"
    ckpt = crafted_checkpoint(tmp_path / "crafted.ckpt", payload)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.ckpt_path = str(ckpt)
    with pytest.raises(Exception, match="GLOBAL os.makedirs"):
        trainer.validate(TeacherModule(model=TEACHER_ARGS), datamodule=DistillDataModule(n_val=2, batch_size=2))
    assert not payload.exists()


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, has weights_only=True) of every ``torch.load(...)`` / bare ``load(...)`` imported from torch."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bare = {
        a.asname or a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "torch"
        for a in node.names
        if a.name == "load"
    }
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_torch_load = (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id == "torch"
        ) or (isinstance(func, ast.Name) and func.id in bare)
        if is_torch_load:
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            out.append((node.lineno, safe))
    return out


def test_every_torch_load_in_src_is_restricted_to_weights():
    calls = {str(p.relative_to(ROOT)): _torch_load_calls(p) for p in sorted(SRC.rglob("*.py"))}
    unsafe = [f"{path}:{line}" for path, found in calls.items() for line, safe in found if not safe]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    assert sum(len(found) for found in calls.values()) >= 2  # the scan sees real calls


def test_the_scan_catches_an_unsafe_call(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nfrom torch import load as tl\n"
        "a = torch.load('x', weights_only=True)\nb = torch.load('x')\n"
        "c = tl('x', weights_only=False)\n"
    )
    assert _torch_load_calls(sample) == [(3, True), (4, False), (5, False)]
