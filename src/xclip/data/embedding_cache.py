"""On-disk cache of a gallery's image and caption embeddings.

One entry is a directory named by the hash of its key (model spec, weights fingerprint,
preprocessing, gallery fingerprint, ...) holding ``embeddings.safetensors`` and ``meta.json``
(the key, the frozen order: image keys, captions, caption -> image, and the tensor file's SHA-256).
A changed key is another directory, so it recomputes; a file whose checksum, shapes or order do
not match is reported in the log and treated as a miss, never used. Both files are written under
a temporary name and renamed; the tensors first, so a crash in between leaves a checksum mismatch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from xclip.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = 1
TENSORS_NAME = "embeddings.safetensors"
META_NAME = "meta.json"


@dataclass
class GalleryEmbeddings:
    """A gallery's embeddings in its frozen order (CPU, float32, L2-normalised).

    image_emb [I, D]; text_emb [T, D]; text_to_image [T] long, each caption's row in image_emb;
    image_index [I] long, each row's gallery index (``arange(I)`` when the whole gallery was seen).
    """

    image_emb: Tensor
    text_emb: Tensor
    text_to_image: Tensor
    image_index: Tensor


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every ``state_dict`` entry's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class EmbeddingCache:
    """The cache entry of `key` (any JSON-able dict) under `root`.

    ``status``: after ``load`` ``"hit"``, ``"miss"`` (no entry) or ``"invalid: <reason>"``; ``save``
    appends ``"; written"`` (e.g. ``"miss; written"``).
    """

    def __init__(self, root: str | Path, key: dict[str, Any]):
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self.dir = Path(root) / _digest(self.key)[:24]
        self.status = "unchecked"

    @property
    def tensors_path(self) -> Path:
        return self.dir / TENSORS_NAME

    @property
    def meta_path(self) -> Path:
        return self.dir / META_NAME

    def load(self, image_keys: list[str], captions: list[str]) -> GalleryEmbeddings | None:
        """The cached embeddings if the entry is complete, intact and in the gallery's current
        order (`image_keys`, `captions`); else None (the reason is logged and in ``status``)."""
        if not self.meta_path.is_file():
            self.status = "miss"
            return None
        try:
            emb = self._read(image_keys, captions)
        except _Invalid as err:
            self.status = f"invalid: {err}"
            log.warning("embedding cache %s is not usable (%s); recomputing the embeddings", self.dir, err)
            return None
        self.status = "hit"
        log.info("embedding cache hit: %s", self.dir)
        return emb

    def _read(self, image_keys: list[str], captions: list[str]) -> GalleryEmbeddings:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Invalid(f"{META_NAME} is unreadable: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != self.key:
            raise _Invalid(f"{META_NAME} belongs to another key or format")
        try:
            data = self.tensors_path.read_bytes()
        except OSError as err:
            raise _Invalid(f"{TENSORS_NAME} is unreadable: {err}") from err
        expected = meta.get("sha256")
        if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != expected:
            raise _Invalid(
                f"{TENSORS_NAME} is corrupt or truncated ({len(data)} bytes, checksum differs from {META_NAME})"
            )
        try:
            t = load_tensors(data)
        except (SafetensorError, ValueError) as err:
            raise _Invalid(f"{TENSORS_NAME} does not parse: {err}") from err
        if meta.get("image_keys") != image_keys or meta.get("captions") != captions:
            raise _Invalid("the gallery's images or captions differ from the cached order")
        missing = [name for name in ("image_emb", "text_emb", "text_to_image", "image_index") if name not in t]
        if missing:
            raise _Invalid(f"{TENSORS_NAME} has no {', '.join(missing)}")
        emb = GalleryEmbeddings(t["image_emb"], t["text_emb"], t["text_to_image"], t["image_index"])
        n_img, n_txt = len(image_keys), len(captions)
        if (
            emb.image_emb.shape[0] != n_img
            or emb.text_emb.shape[0] != n_txt
            or emb.text_to_image.tolist() != meta.get("text_to_image")
            or not torch.equal(emb.image_index, torch.arange(n_img))
        ):
            raise _Invalid(f"tensor shapes or caption owners disagree with {META_NAME}")
        return emb

    def save(self, emb: GalleryEmbeddings, image_keys: list[str], captions: list[str]) -> Path:
        """Store `emb` (a whole gallery, rows in `image_keys` order) with its frozen order."""
        if len(image_keys) != emb.image_emb.shape[0] or len(captions) != emb.text_emb.shape[0]:
            raise ValueError(
                f"{emb.image_emb.shape[0]} image / {emb.text_emb.shape[0]} caption embeddings for "
                f"{len(image_keys)} image keys / {len(captions)} captions"
            )
        data = save_tensors(
            {
                "image_emb": emb.image_emb.detach().float().cpu().contiguous(),
                "text_emb": emb.text_emb.detach().float().cpu().contiguous(),
                "text_to_image": emb.text_to_image.detach().long().cpu().contiguous(),
                "image_index": emb.image_index.detach().long().cpu().contiguous(),
            }
        )
        meta = {
            "format": FORMAT,
            "key": self.key,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "image_keys": list(image_keys),
            "captions": list(captions),
            "text_to_image": emb.text_to_image.tolist(),
        }
        atomic_write_bytes(self.tensors_path, data)
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1))
        self.status = f"{self.status}; written"
        log.info("embedding cache written: %s", self.dir)
        return self.dir


class _Invalid(Exception):
    """A cache entry exists but must not be used."""
