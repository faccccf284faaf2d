"""The ``xclip`` backend: xclip's own checkpoint folders (``xclip:<name>`` under ``checkpoints/``,
or any local directory holding ``config.json`` + ``model.safetensors``) and their format.

A folder holds ``config.json`` (``{"architecture": "openclip", "model_cfg": <open_clip CLIP
kwargs>, "preprocess": {...}, "tokenizer": {"context_length": L}}``), ``model.safetensors`` (float
tensors stored as fp16, loaded as fp32) and usually a ``README.md`` card.
"""

from __future__ import annotations

import json
import os
from difflib import get_close_matches
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...io import atomic_directory
from ..base import Backbone, PreprocessCfg
from ..registry import Backend, register_backend

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def checkpoints_dir() -> Path | None:
    """Root of named checkpoints: $XCLIP_CHECKPOINTS, else the first ``checkpoints/`` found
    walking up from the installed package (the repository's ``checkpoints/``)."""
    env = os.environ.get("XCLIP_CHECKPOINTS")
    if env:
        return Path(env).expanduser()
    for parent in Path(__file__).resolve().parents:
        if (parent / "checkpoints").is_dir():
            return parent / "checkpoints"
    return None


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding an xclip checkpoint (config.json or model.safetensors)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME))


def save_checkpoint(
    model: nn.Module,
    model_cfg: dict,
    preprocess_cfg: PreprocessCfg | dict,
    context_length: int,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write an open_clip CLIP as ``path/{config.json, model.safetensors}``; float tensors are
    stored as ``dtype``.

    Atomic: everything is written into a temporary sibling directory first. An existing checkpoint
    at `path` is replaced only with ``overwrite=True``; it is moved aside as a backup
    (``.<name>.backup-<id>``) and deleted only once the new directory is in place, so a crash
    leaves either the old or the new weights, never half of either. Other files in `path` (the
    model card, notes) are carried over.

    Raises:
        FileExistsError: `path` already holds a checkpoint and `overwrite` is False.
    """
    path = Path(path).expanduser()
    if is_checkpoint_dir(path) and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({CONFIG_NAME} / {WEIGHTS_NAME}); export "
                              "somewhere else, or pass overwrite=True to replace it on purpose")
    if isinstance(preprocess_cfg, dict):
        preprocess_cfg = PreprocessCfg.from_dict(preprocess_cfg)
    config = {
        "architecture": "openclip",
        "model_cfg": model_cfg,
        "preprocess": preprocess_cfg.to_dict(),
        "tokenizer": {"context_length": int(context_length)},
    }
    config_text = json.dumps(config, indent=2)  # fail before touching the disk if not serialisable
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text)
    return path


def read_json(file: Path) -> dict:
    """A JSON object from `file`; a corrupt file is an error naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); restore the file or re-export the checkpoint") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def load_checkpoint(path: str | Path) -> Backbone:
    """Load an xclip checkpoint directory (weights cast to fp32) as an eval-mode backbone.

    Every problem names the file: a missing or corrupt ``config.json`` / ``model.safetensors``,
    missing config keys, weights that do not fit the configured architecture.
    """
    from open_clip.model import CLIP

    from ..openclip import ClipBPETokenizer, OpenCLIPBackbone

    path = Path(path).expanduser()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found: an xclip checkpoint is a directory with {CONFIG_NAME} + {WEIGHTS_NAME}"
            )
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    config = read_json(config_file)
    if config.get("architecture") != "openclip":
        raise ValueError(f"{config_file}: unsupported architecture {config.get('architecture')!r}")
    missing = [k for k in ("model_cfg", "preprocess", "tokenizer") if k not in config]
    if missing:
        raise ValueError(f"{config_file}: missing key(s) {missing}")
    try:
        model = CLIP(**config["model_cfg"])
    except TypeError as err:
        raise ValueError(f"{config_file}: model_cfg does not describe an open_clip CLIP ({err})") from None
    try:
        tensors = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f"{weights_file}: cannot read the weights ({err}); the file is truncated or corrupt: "
                         "restore it or re-export the checkpoint") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_file}: the weights do not fit the architecture in {config_file} ({err})") from None
    context_length = config["tokenizer"]["context_length"]
    if context_length != model.context_length:
        raise ValueError(f"{config_file}: tokenizer context_length {context_length} != model's {model.context_length}")
    preprocess_cfg = PreprocessCfg.from_dict(config["preprocess"])
    backbone = OpenCLIPBackbone(model, ClipBPETokenizer(context_length), preprocess_cfg, model_cfg=config["model_cfg"])
    return backbone.eval()


def checkpoint_path(spec: str | Path) -> Path:
    """The folder of a checkpoint spec: ``"xclip:<name>"`` -> the shipped ``checkpoints/<name>``
    (an error naming the available ones and the recipes if missing); anything else is a path."""
    spec = str(spec)
    return _named_checkpoint(spec.removeprefix("xclip:")) if spec.startswith("xclip:") else Path(spec).expanduser()


def _named_checkpoint(name: str) -> Path:
    root = checkpoints_dir()
    if root is None:
        raise FileNotFoundError(
            f"xclip:{name}: no checkpoints/ directory found above the xclip package; set XCLIP_CHECKPOINTS"
        )
    path = root / name
    if not path.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        close = get_close_matches(name, available, n=1)
        guess = f"; did you mean xclip:{close[0]}?" if close else ""
        raise FileNotFoundError(
            f"xclip:{name}: no checkpoint {path} (available in {root}: {available}{guess}). Each shipped "
            "checkpoint's README.md gives the recipe that made it (configs/<recipe>.yaml, run with `xclip fit`; "
            "e.g. configs/pretrain_tiny_shapes*.yaml for tiny-shapes); a fit exports into its run's log directory "
            "(runs/<name>/version_N/model): pass that directory as the backbone spec, or point "
            "XCLIP_CHECKPOINTS at a directory holding the checkpoint"
        )
    return path


def _claims_path(path: Path) -> bool:
    # a transformers save_pretrained directory also has a config.json, with a model_type
    config = path / CONFIG_NAME
    return is_checkpoint_dir(path) and not (config.is_file() and "model_type" in read_json(config))


register_backend(Backend(
    scheme="xclip",
    load=lambda name: load_checkpoint(_named_checkpoint(name)),
    describe="xclip:<name> for a folder under checkpoints/",
    load_path=load_checkpoint,
    claims_path=_claims_path,
))
