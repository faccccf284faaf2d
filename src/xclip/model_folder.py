"""The one folder format of every model xclip trains, ships and loads.

A model folder holds ``config.json`` (``architecture``: what to build, ``format_version``: how the
rest of the file reads, then the architecture's own keys), ``model.safetensors`` (the weights) and
``README.md`` (the model card), plus whatever an architecture adds (a tokenizer's files). The
tiny CLIP (``openclip``), SEARLE's phi (``searle-phi``), the TSPO head (``tspo-head``) and the
Teacher/Student classifiers (``xclip-distill-classifier``) are all written by `save_folder` and
read by `read_folder`, in the spirit of Hugging Face's ``save_pretrained`` / ``from_pretrained``.

One overwrite rule: a folder that already holds a model is replaced only with ``overwrite=True``,
atomically (`xclip.io.atomic_directory`: the old folder's card, notes and any other file the new
export does not replace are kept). Folders written before ``format_version`` existed (the shipped
``tiny-shapes``; the distill folders, which named the architecture ``format``) read as version 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from xclip.io import atomic_directory, stranded_backups

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
FORMAT_VERSION = 1


@dataclass
class ModelFolder:
    """A model folder read from disk: its path, its config.json (architecture keys included) and
    its weights (fp32 for floating tensors, on the CPU)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def architecture(self) -> str:
        return str(self.config["architecture"])

    def file(self, name: str) -> Path:
        return self.path / name


def holds_model(path: str | Path) -> bool:
    """Whether `path` is a folder that already holds a model (config.json or weights)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME))


def save_folder(
    path: str | Path,
    architecture: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    card: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a model folder atomically and return its path.

    Args:
        path: the folder (created, or replaced with `overwrite`).
        architecture: what `read_folder` callers check, e.g. ``"openclip"``.
        config: the architecture's keys (JSON-serialisable); ``architecture`` and ``format_version``
            are added in front.
        tensors: the state dict to store; floating tensors are cast to `dtype` when given.
        card: the README.md to write when the folder has none yet (a card already there is kept).
        metadata: string metadata stored in the safetensors header (e.g. a label vocabulary).
        write_extra: called with the temporary folder to add more files (a tokenizer).

    Raises:
        FileExistsError: `path` already holds a model and `overwrite` is False.
        NotADirectoryError: `path` is a file.
    """
    path = Path(path).expanduser()
    if holds_model(path) and not overwrite:
        raise FileExistsError(
            f"{path} already holds a model ({CONFIG_NAME} / {WEIGHTS_NAME}): export somewhere "
            "else, or pass overwrite=True (overwrite: true in a config) to replace it on purpose"
        )
    text = (
        json.dumps({"architecture": architecture, "format_version": FORMAT_VERSION, **config}, indent=2, default=str)
        + "\n"
    )  # fails before touching the disk if not serialisable
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in tensors.items()
    }
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        if write_extra is not None:
            write_extra(tmp)
        if card is not None and not (path / CARD_NAME).is_file():
            (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return path


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; a corrupt file is an error naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); restore the file or re-export the model") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def missing_folder_error(path: Path) -> FileNotFoundError:
    """The error for a model folder that is not there: it names a backup a killed export left and the
    command that restores it."""
    backups = stranded_backups(path)
    if backups:  # an export was killed after moving this folder aside: say how to get it back
        return FileNotFoundError(
            f"{path}: no such model folder, but {backups[-1]} holds its previous version (an "
            f"export was interrupted): restore it with `mv {backups[-1]} {path}`"
        )
    return FileNotFoundError(f"{path}: no such model folder (expected a folder with {CONFIG_NAME} + {WEIGHTS_NAME})")


def read_config(path: str | Path, architectures: str | Iterable[str]) -> dict[str, Any]:
    """The config.json of a model folder, checked: it exists, is a JSON object, names one of
    `architectures` and a format version this xclip reads. Every error names the file."""
    path = Path(path).expanduser()
    wanted = (architectures,) if isinstance(architectures, str) else tuple(architectures)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise missing_folder_error(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model folder holds {CONFIG_NAME} + {WEIGHTS_NAME}")
    config = read_json(file)
    architecture = config.get("architecture", config.get("format"))  # distill folders before format_version
    if architecture not in wanted:
        raise ValueError(f"{file}: architecture {architecture!r}, expected {' or '.join(map(repr, wanted))}")
    version = config.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {version!r} is newer than this xclip reads ({FORMAT_VERSION}): upgrade xclip"
        )
    return {**config, "architecture": architecture, "format_version": version}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a model folder, floating tensors as fp32; a missing or corrupt file is an error
    naming it."""
    file = Path(path).expanduser() / WEIGHTS_NAME
    if not file.parent.is_dir():
        raise missing_folder_error(file.parent)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model folder holds {CONFIG_NAME} + {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers/data
        raise ValueError(
            f"{file}: cannot read the weights ({err}); the file is truncated or corrupt: restore it "
            "or re-export the model"
        ) from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def read_folder(path: str | Path, architectures: str | Iterable[str]) -> ModelFolder:
    """Config and weights of a model folder (see `read_config`, `read_weights`)."""
    path = Path(path).expanduser()
    return ModelFolder(path, read_config(path, architectures), read_weights(path))


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def load_state(module: ModuleT, folder: ModelFolder) -> ModuleT:
    """Load `folder`'s weights into `module` strictly; a mismatch names the folder's files."""
    try:
        module.load_state_dict(folder.tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{folder.file(WEIGHTS_NAME)}: the weights do not fit the architecture in "
            f"{folder.file(CONFIG_NAME)} ({err})"
        ) from None
    return module
