"""The shipped format of a trained Teacher/Student model: a folder with ``model.safetensors``,
``config.json`` (the architecture with the towers' resolved configs, the tasks and their class
names, the text length) and the tokenizer files (``save_pretrained``), written to a temporary
folder and renamed into place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from xclip.distill.model import MultimodalClassifier
from xclip.io import atomic_directory

FORMAT = "xclip-distill-classifier"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def resolve_checkpoint(spec: str | Path) -> Path:
    """``xclip:<name>`` (a folder under the repository's ``checkpoints/``) or a folder path."""
    from xclip.backbones import checkpoint_path

    path = checkpoint_path(spec)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{spec}: not a Teacher/Student checkpoint folder ({path.absolute()} needs "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    return path


def save_classifier(model: MultimodalClassifier, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                    max_length: int, extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16,
                    overwrite: bool = False) -> Path:
    """Write `model` (weights stored as `dtype`) and `tokenizer` to `out_dir`; `extra` goes into
    config.json (e.g. the recipe). An existing folder is replaced only with `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (or another folder) to replace it")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    config = {"format": FORMAT, "model": model.config(), "max_length": int(max_length), **(extra or {})}
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        tokenizer.save_pretrained(str(tmp))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_classifier(spec: str | Path) -> tuple[MultimodalClassifier, PreTrainedTokenizerBase, dict[str, Any]]:
    """(the model in fp32, eval mode; its tokenizer; the config.json contents) of a checkpoint folder."""
    from xclip.distill.tokenizer import load_tokenizer

    path = resolve_checkpoint(spec)
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME}: format {config.get('format')!r}, expected {FORMAT!r}")
    model = MultimodalClassifier(**config["model"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS_NAME)).items()}
    model.load_state_dict(state)
    return model.eval(), load_tokenizer(path), config
