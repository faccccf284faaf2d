"""Atomic exports (`xclip.io.atomic_directory`) keep what a user put in the folder, leave normal
permissions, and recover from a process killed half-way; `refuse_export_over` refuses an export
target it could not write before any training."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from xclip.io import atomic_directory, recover_directory, stranded_backups
from xclip.results import refuse_export_over


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _old_export(path: Path) -> None:
    path.mkdir()
    (path / "model.safetensors").write_text("old weights")
    (path / "README.md").write_text("card")
    (path / "notes").mkdir()
    (path / "notes" / "eval.txt").write_text("my evaluation")
    (path / "plots" / "deep").mkdir(parents=True)
    (path / "plots" / "deep" / "a.png").write_text("png")


def test_overwrite_keeps_the_users_subfolders_and_replaces_only_what_it_writes(tmp_path):
    target = tmp_path / "model"
    _old_export(target)
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("new weights")
        (tmp / "plots").mkdir()
        (tmp / "plots" / "b.png").write_text("new png")
    assert _tree(target) == {
        "README.md": "card",
        "model.safetensors": "new weights",
        "notes/eval.txt": "my evaluation",
        "plots/b.png": "new png",
        "plots/deep/a.png": "png",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_exported_folders_and_files_get_normal_permissions(tmp_path):
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "model", *(tmp_path / "model").rglob("*")]}
    assert modes == {"model": 0o755, "sub": 0o755, "w.bin": 0o644}


_KILLED_EXPORT = """
import os, sys
from pathlib import Path
from xclip import io
target, when = Path(sys.argv[1]), sys.argv[2]
real_rename = Path.rename
def rename(self, dest):
    out = real_rename(self, dest)
    if when == "after-backup" and ".backup-" in str(dest):
        os._exit(9)  # killed right after the old folder was moved aside
    return out
Path.rename = rename
with io.atomic_directory(target) as tmp:
    (tmp / "model.safetensors").write_text("new weights")
    if when == "while-writing":
        os._exit(9)  # killed while writing
"""


def _kill_during_export(target: Path, when: str) -> None:
    done = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(target), when], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr


def test_a_backup_stranded_by_a_killed_export_is_restored_the_next_time_the_path_is_used(tmp_path):
    target = tmp_path / "model"
    _old_export(target)
    before = _tree(target)
    _kill_during_export(target, "after-backup")
    assert not target.exists() and len(stranded_backups(target)) == 1  # what the crash leaves
    recover_directory(target)
    assert _tree(target) == before and stranded_backups(target) == []


def test_an_export_after_a_killed_one_starts_from_the_restored_folder(tmp_path):
    target = tmp_path / "model"
    _old_export(target)
    _kill_during_export(target, "after-backup")
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("newer weights")
    assert _tree(target)["notes/eval.txt"] == "my evaluation" and _tree(target)["README.md"] == "card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_temporary_folder_of_a_killed_export_is_removed_the_next_time(tmp_path):
    target = tmp_path / "model"
    _old_export(target)
    before = _tree(target)
    _kill_during_export(target, "while-writing")
    assert any(".model.tmp-" in p.name for p in tmp_path.iterdir())  # what the crash leaves
    assert _tree(target) == before
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refuse_export_over_refuses_a_file_before_training(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match=r"weights.bin is a file; pass a directory"):
        refuse_export_over(tmp_path / "weights.bin", overwrite=True, shipped="checkpoints/x")
    with pytest.raises(ValueError, match=r"weights.bin is a file"):
        refuse_export_over(tmp_path / "weights.bin" / "model", overwrite=True, shipped="checkpoints/x")
    with pytest.raises(NotADirectoryError, match=r"weights.bin is a file"):
        with atomic_directory(tmp_path / "weights.bin"):
            pass
    refuse_export_over(tmp_path / "new", overwrite=False, shipped="checkpoints/x")  # a new folder is fine


def test_refuse_export_over_restores_a_stranded_backup_and_then_refuses_it(tmp_path):
    target = tmp_path / "model"
    _old_export(target)
    _kill_during_export(target, "after-backup")
    with pytest.raises(ValueError, match="already exists"):
        refuse_export_over(target, overwrite=False, shipped="checkpoints/x")
    assert (target / "notes" / "eval.txt").is_file()
    assert os.listdir(tmp_path) == ["model"]


def test_loading_a_folder_whose_export_was_killed_names_the_backup_and_how_to_restore_it(tmp_path, repo_root):
    import shutil

    from xclip.backbones import load_backbone

    target = tmp_path / "model"
    shutil.copytree(repo_root / "checkpoints" / "tiny-shapes", target)
    _kill_during_export(target, "after-backup")
    (backup,) = stranded_backups(target)
    with pytest.raises(FileNotFoundError, match=rf"{backup} holds its previous version .*`mv {backup} {target}`"):
        load_backbone(str(target))
