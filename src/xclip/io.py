"""Atomic file and directory writes: outputs are written to a temporary name and renamed into
place, so a crash never leaves a half-written file or checkpoint directory behind."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `rows` (dicts keyed by `columns`; missing keys -> empty cells) as a UTF-8 CSV with a
    header row, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


_TMP_TAG, _BACKUP_TAG = ".tmp-", ".backup-"
log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _siblings(path: Path, tag: str) -> list[Path]:
    """``.<name><tag>*`` directories next to `path`, oldest first."""
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.glob(f".{glob.escape(path.name)}{tag}*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def stranded_backups(path: str | os.PathLike) -> list[Path]:
    """Backups `atomic_directory` left next to `path` when a process died between moving the old
    directory aside and deleting it, oldest first."""
    return _siblings(Path(path).expanduser(), _BACKUP_TAG)


def recover_directory(path: str | os.PathLike) -> None:
    """Tidy what a killed `atomic_directory` left next to `path`: a backup whose replacement never
    arrived is renamed back to `path` (the newest one, if several); a backup next to a complete
    `path` is deleted (the swap had finished); temporary directories of dead processes are deleted."""
    path = Path(path).expanduser()
    for tmp in _siblings(path, _TMP_TAG):
        pid = tmp.name[len(path.name) + 1 + len(_TMP_TAG) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.warning("removing %s: the unfinished export of a process that no longer runs", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    backups = stranded_backups(path)
    if backups and not path.exists():
        log.warning(
            "restoring %s from %s: an export was interrupted after moving the old folder aside", path, backups[-1]
        )
        backups[-1].rename(path)
        backups = backups[:-1]
    for backup in backups:
        log.warning("removing %s: the export that replaced it had completed", backup)
        shutil.rmtree(backup, ignore_errors=True)


def _open_permissions(root: Path) -> None:
    """Temp directories are private (0700); an output directory is for everyone: 0755 folders,
    0644 files."""
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            (Path(folder) / name).chmod(0o755)
        for name in files:
            (Path(folder) / name).chmod(0o644)
    root.chmod(0o755)


def _carry_over(old: Path, new: Path) -> None:
    """Copy into `new` everything under `old` that `new` does not replace (a model card, a user's
    notes/ folder, files inside a subfolder both hold)."""
    for entry in old.iterdir():
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if not target.exists():
                shutil.copytree(entry, target, symlinks=True)
            elif target.is_dir():
                _carry_over(entry, target)
        elif not target.exists() and not target.is_symlink():
            shutil.copy2(entry, target, follow_symlinks=False)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory that appears at `path` only once complete.

    Yields an empty temporary sibling directory (``.<name>.tmp-<pid>-<id>``) to write into. On
    success everything of an existing `path` that the new directory does not replace (a model card,
    a user's subfolders) is copied in, the old `path` moved aside as a backup
    (``.<name>.backup-<id>``), the new directory renamed into place, and only then the backup
    deleted: a crash leaves either the old or the new directory, never half of either. A process
    killed in between leaves a backup or a temporary directory behind; the next `atomic_directory`
    on that path (and `recover_directory`) restores or removes them. On error the temporary
    directory is removed and `path` is untouched.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file: export into a directory (a new or an existing folder)")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            _carry_over(path, tmp)
        _open_permissions(tmp)
        if not path.exists():
            tmp.rename(path)
            return
        # a directory cannot be replaced atomically by rename: move the old one aside first
        backup = path.with_name(f".{path.name}{_BACKUP_TAG}{uuid.uuid4().hex[:8]}")
        path.rename(backup)
        tmp.rename(path)
        shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
