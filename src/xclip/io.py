"""Atomic file and directory writes: outputs are written to a temporary name and renamed into
place, so a crash never leaves a half-written file or checkpoint directory behind."""

from __future__ import annotations

import contextlib
import csv
import io
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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory that appears at `path` only once complete.

    Yields an empty temporary sibling directory to write into. On success an existing `path` is
    moved aside as a backup (``.<name>.backup-<id>``), the new directory renamed into place, and
    only then the backup deleted: a crash leaves either the old or the new directory, never half
    of either. Files of the old directory that the new one lacks (a model card, notes) are carried
    over. On error the temporary directory is removed and `path` is untouched.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for file in tmp.iterdir():  # temp files are private; an output directory is for everyone
            file.chmod(0o644)
        tmp.chmod(0o755)
        if not path.exists():
            tmp.rename(path)
            return
        for extra in path.iterdir():  # keep what else lives there (the model card, notes)
            if extra.is_file() and not (tmp / extra.name).exists():
                shutil.copy2(extra, tmp / extra.name)
        # a directory cannot be replaced atomically by rename: move the old one aside first
        backup = path.with_name(f".{path.name}.backup-{uuid.uuid4().hex[:8]}")
        path.rename(backup)
        tmp.rename(path)
        shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
