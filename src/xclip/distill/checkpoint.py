"""The shipped format of a trained Teacher/Student model: a model folder (`xclip.model_folder`,
architecture ``xclip-distill-classifier``): ``model.safetensors``, ``config.json`` (the towers'
resolved configs, the tasks and their class names, the text length) and the tokenizer files
(``save_pretrained``), written atomically.

The heads' outputs are the classes in the order config.json lists them, so that order is bound to
the weights: the label vocabulary and its fingerprint (`label_fingerprint`) are stored in the
weights file's metadata and in config.json, and a folder whose config.json lists other classes or
another order than its weights were saved with is refused. Folders saved before the fingerprint
existed (the shipped ``distill-*-shapes``) load with their stored order, flagged
``label_order_checked: False`` so that the modules compare it with the data's own classes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from xclip.distill.model import MultimodalClassifier
from xclip.model_folder import CONFIG_NAME, WEIGHTS_NAME, load_state, read_folder, save_folder

FORMAT = "xclip-distill-classifier"
LABELS_KEY, FINGERPRINT_KEY = "xclip_labels", "label_fingerprint"  # safetensors metadata / config.json


def label_fingerprint(tasks: Mapping[str, Sequence[str]]) -> str:
    """``sha256:<16 hex>`` of the tasks and their classes in label-id order: any renamed, added,
    removed or reordered class (or task) changes it."""
    canonical = json.dumps(
        [[str(t), [str(c) for c in classes]] for t, classes in tasks.items()], ensure_ascii=False, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def resolve_checkpoint(spec: str | Path) -> Path:
    """``xclip:<name>`` (a folder under the repository's ``checkpoints/``) or a folder path."""
    from xclip.backbones import checkpoint_path

    path = checkpoint_path(spec)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{spec}: not a Teacher/Student checkpoint folder ({path.absolute()} needs "
            f"{CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    return path


def save_classifier(
    model: MultimodalClassifier,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    max_length: int,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write `model` (weights stored as `dtype`) and `tokenizer` to `out_dir`; `extra` goes into
    config.json (e.g. the recipe). A folder that already holds a model is replaced only with
    `overwrite`."""
    fingerprint = label_fingerprint(model.tasks)
    config = {"model": model.config(), FINGERPRINT_KEY: fingerprint, "max_length": int(max_length), **(extra or {})}
    metadata = {LABELS_KEY: json.dumps(model.tasks, ensure_ascii=False), FINGERPRINT_KEY: fingerprint}

    def write_tokenizer(tmp: Path) -> None:
        tokenizer.save_pretrained(str(tmp))

    return save_folder(
        out_dir,
        FORMAT,
        config,
        model.state_dict(),
        dtype=dtype,
        overwrite=overwrite,
        metadata=metadata,
        write_extra=write_tokenizer,
    )


def check_label_order(path: Path, config: Mapping[str, Any]) -> bool:
    """Whether config.json's classes are those `path`'s weights were saved with (True), or cannot be
    checked (False: saved before label fingerprints). Raises when they differ."""
    tasks = config["model"]["tasks"]
    actual = label_fingerprint(tasks)
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as weights:
        metadata = weights.metadata() or {}
    trained = metadata.get(FINGERPRINT_KEY)
    listed = config.get(FINGERPRINT_KEY)
    for stored, where in ((trained, f"{WEIGHTS_NAME} was saved with"), (listed, f"{CONFIG_NAME} records")):
        if stored is not None and stored != actual:
            saved_labels = f" {json.loads(metadata[LABELS_KEY])}" if LABELS_KEY in metadata else ""
            raise ValueError(
                f"{path / CONFIG_NAME}: `model.tasks` lists the classes {tasks} (label fingerprint "
                f"{actual}), but {where} another label vocabulary{saved_labels} (fingerprint {stored}): "
                "the classes were reordered, renamed or changed after saving, and every head would "
                "report its outputs under the wrong names. Restore the saved classes in their order."
            )
    return trained is not None or listed is not None


def load_classifier(spec: str | Path) -> tuple[MultimodalClassifier, PreTrainedTokenizerBase, dict[str, Any]]:
    """(the model in fp32, eval mode; its tokenizer; the config.json contents plus
    ``label_order_checked``: whether a label fingerprint confirmed the class order, see
    `check_label_order`) of a checkpoint folder."""
    from xclip.distill.tokenizer import load_tokenizer

    folder = read_folder(resolve_checkpoint(spec), FORMAT)
    config = folder.config
    config["label_order_checked"] = check_label_order(folder.path, config)
    model = MultimodalClassifier(**config["model"])
    load_state(model, folder)
    return model.eval(), load_tokenizer(folder.path), config
