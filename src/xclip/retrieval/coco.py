"""COCO caption galleries: the official ``captions_val2017.json`` format and the Karpathy split
JSON (``dataset_coco.json``). Both return a :class:`FileGallery` in a frozen order (ascending
COCO image id); a malformed entry or a missing image file raises an error naming the file, the
entry and what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from xclip.retrieval.gallery import FileGallery

KARPATHY_SPLITS = ("train", "restval", "val", "test")


class AnnotationError(ValueError):
    """An annotation file is malformed (the message names the file and the entry)."""


def load_coco_captions(
    root: str | Path,
    annotations: str = "annotations/captions_val2017.json",
    images: str = "val2017",
    n: int | None = 5000,
    seed: int = 0,
    image_size: int = 224,
) -> FileGallery:
    """COCO captions: a seeded random subset of `n` images (all if None) with all their captions.

    Args:
        root: the COCO directory; `annotations` and `images` are relative to it (or absolute).
        annotations: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
        images: the image directory the ``file_name`` entries are relative to.
        n, seed: subset size and the seed of its draw; the subset is kept in ascending image id.
        image_size: side of the square [0, 1] images (shorter side resized, centre crop).
    """
    ann_path, image_dir = Path(root) / annotations, Path(root) / images
    data = _read_json(ann_path, "COCO captions")
    for field in ("images", "annotations"):
        if not isinstance(data.get(field), list):
            raise AnnotationError(
                f"{ann_path}: no {field!r} list at the top level; expected the official "
                "captions_*.json format ({'images': [...], 'annotations': [...]})"
            )
    files: dict[int, str] = {}
    for i, entry in enumerate(data["images"]):
        image_id, name = (
            _field(entry, "id", int, ann_path, f"images[{i}]"),
            _field(entry, "file_name", str, ann_path, f"images[{i}]"),
        )
        if image_id in files:
            raise AnnotationError(f"{ann_path}: images[{i}] repeats image id {image_id}")
        files[image_id] = name
    captions: dict[int, list[str]] = {}
    for i, entry in enumerate(data["annotations"]):
        where = f"annotations[{i}]" + (f" (id {entry['id']})" if isinstance(entry, dict) and "id" in entry else "")
        image_id = _field(entry, "image_id", int, ann_path, where)
        text = _field(entry, "caption", str, ann_path, where).strip()
        if image_id not in files:
            raise AnnotationError(f"{ann_path}: {where} refers to image id {image_id}, which is not in 'images'")
        if not text:
            raise AnnotationError(f"{ann_path}: {where} has an empty caption")
        captions.setdefault(image_id, []).append(text)
    ids = sorted(captions)  # images without captions cannot be evaluated
    chosen = _subset(ids, n, seed, ann_path)
    _check_files(image_dir, [files[i] for i in chosen], [f"image id {i}" for i in chosen], ann_path)
    source = {
        "source": "coco",
        "annotations": str(ann_path.resolve()),
        "images": str(image_dir.resolve()),
        "subset_n": n,
        "subset_seed": seed,
    }
    return FileGallery(image_dir, [files[i] for i in chosen], [captions[i] for i in chosen], image_size, source)


def load_karpathy(
    root: str | Path,
    annotations: str = "dataset_coco.json",
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int = 224,
) -> FileGallery:
    """A Karpathy split: ``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}],
    "cocoid"}]}``; image files at ``root/filepath/filename``; `n` a seeded subset (None: all).
    Images keep the file's order (the 5k test split in its usual order)."""
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}; choose from {KARPATHY_SPLITS}")
    ann_path = Path(root) / annotations
    data = _read_json(ann_path, "Karpathy split")
    if not isinstance(data.get("images"), list):
        raise AnnotationError(
            f"{ann_path}: no 'images' list at the top level; expected the Karpathy "
            "dataset_coco.json format ({'images': [{'filepath', 'filename', 'split', 'sentences'}]})"
        )
    files, caps, names = [], [], []
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]" + (
            f" (cocoid {entry['cocoid']})" if isinstance(entry, dict) and "cocoid" in entry else ""
        )
        if _field(entry, "split", str, ann_path, where) != split:
            continue
        folder = _field(entry, "filepath", str, ann_path, where) if "filepath" in entry else ""
        name = _field(entry, "filename", str, ann_path, where)
        sentences = _field(entry, "sentences", list, ann_path, where)
        texts = []
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                raise AnnotationError(f"{ann_path}: {where} sentences[{j}] has no non-empty 'raw' caption")
            texts.append(raw.strip())
        if not texts:
            raise AnnotationError(f"{ann_path}: {where} has no sentences")
        files.append(f"{folder}/{name}" if folder else name)
        caps.append(texts)
        names.append(where)
    if not files:
        raise AnnotationError(f"{ann_path}: no image has split {split!r}")
    chosen = _subset(list(range(len(files))), n, seed, ann_path)
    _check_files(Path(root), [files[i] for i in chosen], [names[i] for i in chosen], ann_path)
    source = {
        "source": "karpathy",
        "annotations": str(ann_path.resolve()),
        "images": str(Path(root).resolve()),
        "split": split,
        "subset_n": n,
        "subset_seed": seed,
    }
    return FileGallery(root, [files[i] for i in chosen], [caps[i] for i in chosen], image_size, source)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} annotation file {path} not found; download it and point the loader's root/annotations at it"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err}); re-download the {what} annotations") from err
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _field(entry: Any, name: str, kind: type, path: Path, where: str) -> Any:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where} is a {type(entry).__name__}, expected an object")
    value = entry.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AnnotationError(
            f"{path}: {where} has {'no' if name not in entry else 'a malformed'} {name!r} "
            f"(expected {kind.__name__}, got {value!r}); fix or remove the entry"
        )
    return value


def _subset(items: list, n: int | None, seed: int, path: Path) -> list:
    """A seeded random subset of `n` items, kept in their original order."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        raise ValueError(f"subset size n must be > 0 or None (all {len(items)} images of {path}), got {n}")
    picked = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[int(i)] for i in picked]


def _check_files(image_dir: Path, files: list[str], entries: list[str], ann_path: Path) -> None:
    for name, entry in zip(files, entries):
        if not (image_dir / name).is_file():
            raise FileNotFoundError(
                f"image {image_dir / name} ({entry} of {ann_path}) is missing; put the images "
                f"under {image_dir} or set the loader's images directory"
            )
