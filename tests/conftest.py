"""What every workflow's tests use: the repository root and the shipped tiny CLIP, loaded once per
session. Tests live beside the code they check (``tests/<workflow>/``, ``tests/shared/`` for the
shared layers); the file writers of real on-disk formats are plain modules in ``tests/helpers/``
(on the import path, see ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (configs/, checkpoints/, examples/)."""
    return ROOT


@pytest.fixture(scope="session")
def tiny_shapes():
    """The shipped tiny CLIP (``xclip:tiny-shapes``), the process-wide shared object: read it, never
    change it in place (load a private copy with `load_backbone` for that)."""
    from xclip.backbones import shared_backbone

    return shared_backbone("xclip:tiny-shapes")
