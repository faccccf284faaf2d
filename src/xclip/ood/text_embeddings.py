"""Text embeddings of a vocabulary, computed once: in memory for the run, optionally on disk.

The disk entry is keyed by the backbone spec, a fingerprint of its weights (so two random inits
of one architecture never share an entry) and the exact list of texts; it is a safetensors file
written atomically and checked for its shape on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from xclip.backbones.base import Backbone
from xclip.data.embedding_cache import weights_fingerprint
from xclip.io import atomic_write_bytes

log = logging.getLogger(__name__)


class TextEmbeddings:
    """``embed(texts) -> [K, D]`` L2-normalised float32 CPU embeddings, each distinct list encoded once.

    Args:
        backbone: the text encoder.
        spec: the backbone's spec string (part of the disk key).
        batch_size: texts per ``encode_text`` call.
        cache_dir: a directory for the disk cache, or None for memory only.
    Attributes:
        encoded: number of texts actually run through the text encoder (cache misses).
    """

    def __init__(self, backbone: Backbone, spec: str = "", batch_size: int = 256, cache_dir: str | Path | None = None):
        self.backbone, self.spec, self.batch_size = backbone, spec, batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.encoded = 0
        self._memory: dict[str, Tensor] = {}
        self._fingerprint: str | None = None

    def _key(self, texts: list[str]) -> str:
        payload = json.dumps(texts, ensure_ascii=False).encode()
        return hashlib.sha256(payload).hexdigest()

    def _disk_path(self, key: str) -> Path | None:
        """The disk cache file of `key`, None without a cache directory."""
        if self.cache_dir is None:
            return None
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.backbone.model)
        name = hashlib.sha256(f"{self.spec}|{self._fingerprint}|{key}".encode()).hexdigest()[:32]
        return self.cache_dir / f"text_{name}.safetensors"

    def embed(self, texts: Sequence[str]) -> Tensor:
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to embed")
        key = self._key(texts)
        if key in self._memory:
            return self._memory[key]
        path = self._disk_path(key)
        emb = self._load(path, len(texts)) if path is not None else None
        if emb is None:
            emb = self._encode(texts)
            if path is not None:
                atomic_write_bytes(path, save_tensors({"emb": emb.contiguous()}))
        self._memory[key] = emb
        return emb

    __call__ = embed

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Tensor:
        emb = self.backbone.encode_texts(texts, self.batch_size).float().cpu()
        self.encoded += len(texts)
        return F.normalize(emb, dim=-1)

    def _load(self, path: Path, n: int) -> Tensor | None:
        if not path.is_file():
            return None
        try:
            emb = load_tensors(path.read_bytes()).get("emb")
        except (OSError, SafetensorError, ValueError) as err:
            log.warning("text embedding cache %s is unreadable (%s); recomputing", path, err)
            return None
        if emb is None or emb.ndim != 2 or emb.shape[0] != n:
            log.warning("text embedding cache %s has the wrong shape; recomputing", path)
            return None
        return emb.float()
