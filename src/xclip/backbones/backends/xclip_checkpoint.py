"""The ``xclip`` backend: xclip's own checkpoint folders (``xclip:<name>`` under ``checkpoints/``,
or any local directory holding ``config.json`` + ``model.safetensors``) and their format.

A folder is a model folder (`xclip.model_folder`): ``config.json`` (``{"architecture": "openclip",
"format_version": 1, "model_cfg": <open_clip CLIP kwargs>, "preprocess": {...}, "tokenizer":
{"context_length": L}}``), ``model.safetensors`` (float tensors stored as fp16, loaded as fp32) and
usually a ``README.md`` card.
"""

from __future__ import annotations

import os
from difflib import get_close_matches
from pathlib import Path

import torch
from torch import nn

from ...model_folder import (
    CONFIG_NAME,
    ModelFolder,
    holds_model,
    load_state,
    read_config,
    read_json,
    read_weights,
    save_folder,
)
from ..base import Backbone, PreprocessCfg
from ..registry import Backend, register_backend

ARCHITECTURE = "openclip"


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
    return holds_model(path)


def save_checkpoint(
    model: nn.Module,
    model_cfg: dict,
    preprocess_cfg: PreprocessCfg | dict,
    context_length: int,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write an open_clip CLIP as a model folder (`xclip.model_folder`, architecture ``openclip``);
    float tensors are stored as ``dtype``. Atomic; a folder that already holds a model is replaced
    only with ``overwrite=True`` (its card and other files are kept).

    Raises:
        FileExistsError: `path` already holds a model and `overwrite` is False.
    """
    if isinstance(preprocess_cfg, dict):
        preprocess_cfg = PreprocessCfg.from_dict(preprocess_cfg)
    config = {
        "model_cfg": model_cfg,
        "preprocess": preprocess_cfg.to_dict(),
        "tokenizer": {"context_length": int(context_length)},
    }
    return save_folder(path, ARCHITECTURE, config, model.state_dict(), dtype=dtype, overwrite=overwrite)


def load_checkpoint(path: str | Path) -> Backbone:
    """Load an xclip checkpoint folder (weights cast to fp32) as an eval-mode backbone.

    Every problem names the file: a missing or corrupt ``config.json`` / ``model.safetensors``,
    missing config keys, weights that do not fit the configured architecture.
    """
    from open_clip.model import CLIP

    from ..openclip import ClipBPETokenizer, OpenCLIPBackbone

    config = read_config(path, ARCHITECTURE)
    config_file = Path(path).expanduser() / CONFIG_NAME
    missing = [k for k in ("model_cfg", "preprocess", "tokenizer") if k not in config]
    if missing:
        raise ValueError(f"{config_file}: missing key(s) {missing}")
    try:
        model = CLIP(**config["model_cfg"])
    except TypeError as err:
        raise ValueError(f"{config_file}: model_cfg does not describe an open_clip CLIP ({err})") from None
    folder = ModelFolder(Path(path).expanduser(), config, read_weights(path))
    load_state(model, folder)
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


register_backend(
    Backend(
        scheme="xclip",
        load=lambda name: load_checkpoint(_named_checkpoint(name)),
        describe="xclip:<name> for a folder under checkpoints/",
        load_path=load_checkpoint,
        claims_path=_claims_path,
    )
)
