"""Caption galleries: images with one or more captions each, in a frozen order.

A gallery is what retrieval evaluates and what failure analysis reads back: image ``i`` and its
captions are addressed by position, ``key(i)`` names the image in outputs (a file path relative
to the image root, or an id), and ``fingerprint()`` identifies the source, subset and image size
for the embedding cache. Images are float [3, S, S] in [0, 1]; a model's normalisation is the
backbone's job (``backbone.normalize``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from xclip.data.images import ImageReadError, read_rgb, resize_center_crop
from xclip.data.shapes.datasets import ShapesCaptions
from xclip.data.shapes.generator import sample_rng
from xclip.data.shapes.scene import Scene, caption, sample_scene


class CaptionGallery(Dataset):
    """Base class: subclasses implement ``__len__``, ``image``, ``captions``, ``key`` and
    ``fingerprint``. Items are ``{"image": [3,S,S], "captions": list[str], "index": i}``, the
    format ``collate_captions`` batches."""

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Tensor:
        """Image `i` as float [3, S, S] in [0, 1]."""
        raise NotImplementedError

    def captions(self, i: int) -> list[str]:
        """The captions of image `i`, in their frozen order."""
        raise NotImplementedError

    def key(self, i: int) -> str:
        """A stable name for image `i` (path relative to the image root, or an id)."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """JSON-able description of source + subset + image size (part of the cache key)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """``key(i)`` for every image, in order."""
        return [self.key(i) for i in range(len(self))]

    def all_captions(self) -> tuple[list[str], Tensor]:
        """Every caption in gallery order and ``text_to_image`` [T] long (each caption's image)."""
        texts, owner = [], []
        for i in range(len(self)):
            caps = self.captions(i)
            texts.extend(caps)
            owner.extend([i] * len(caps))
        return texts, torch.tensor(owner, dtype=torch.long)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a gallery of {len(self)} images")
        return {"image": self.image(i), "captions": self.captions(i), "index": i}


class ShapesGallery(CaptionGallery):
    """ShapesWorld retrieval gallery (the same samples as ``ShapesCaptions`` with these arguments)
    plus ``scene(i)``, the scene graph behind image `i`'s captions, for automatic failure labels."""

    def __init__(
        self,
        n: int = 1000,
        seed: int = 1000,
        image_size: int = 64,
        max_objects: int = 3,
        captions_per_image: int = 2,
        split: str = "val",
    ):
        self.source = ShapesCaptions(
            n=n,
            seed=seed,
            image_size=image_size,
            max_objects=max_objects,
            captions_per_image=captions_per_image,
            split=split,
        )

    def __len__(self) -> int:
        return len(self.source)

    def scene(self, i: int) -> Scene:
        """The scene graph of image `i` (drawn without rendering the image)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a gallery of {len(self)} images")
        s = self.source
        return sample_scene(sample_rng(s.seed, "captions", i, s.split), max_objects=s.max_objects)

    def image(self, i: int) -> Tensor:
        return self.source.sample(i).tensor()

    def captions(self, i: int) -> list[str]:
        scene = self.scene(i)
        return [caption(scene, v) for v in range(self.source.captions_per_image)]

    def key(self, i: int) -> str:
        s = self.source
        return f"shapes:{s.seed}:{i}" if s.split != "test" else f"shapes:test:{s.seed}:{i}"

    def fingerprint(self) -> dict:
        s = self.source
        return {
            "source": "shapes",
            "n": s.n,
            "seed": s.seed,
            "image_size": s.image_size,
            "max_objects": s.max_objects,
            "captions_per_image": s.captions_per_image,
            "split": s.split,
        }


class FileGallery(CaptionGallery):
    """Images on disk with their captions (COCO, Karpathy, any list of files).

    Images are resized so the shorter side is `image_size` (bicubic, antialiased) and centre-
    cropped to `image_size` x `image_size`, as CLIP preprocessing does.

    Args:
        root: the image directory; `files` are relative to it.
        files: one relative path per image, in gallery order.
        captions: one non-empty caption list per image.
        image_size: output side length S.
        source: a description of where the list came from (annotation file, split, subset seed),
            part of ``fingerprint()``.
    """

    def __init__(
        self,
        root: str | Path,
        files: list[str],
        captions: list[list[str]],
        image_size: int = 224,
        source: dict | None = None,
    ):
        if len(files) != len(captions):
            raise ValueError(f"{len(files)} image files but {len(captions)} caption lists")
        self.root, self.files, self._captions = Path(root), list(files), [list(c) for c in captions]
        self.image_size, self.source = int(image_size), dict(source or {})

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        """The file of image `i` (FileNotFoundError naming it and the image root if it is gone)."""
        path = self.root / self.files[i]
        if not path.is_file():
            raise FileNotFoundError(
                f"gallery image {i} ({self.files[i]!r}) is missing: expected it at {path}; "
                f"check the image root (now {self.root}) or re-download the images"
            )
        return path

    def image(self, i: int) -> Tensor:
        path = self.path(i)
        try:
            im = read_rgb(path)
        except ImageReadError as err:
            raise ImageReadError(
                path, f"gallery image {i} cannot be decoded ({err.reason}); replace the file"
            ) from None
        return resize_center_crop(im, self.image_size)

    def captions(self, i: int) -> list[str]:
        return list(self._captions[i])

    def key(self, i: int) -> str:
        return self.files[i]

    def fingerprint(self) -> dict:
        """The source description, size, image size and a digest of every file's name, size and
        modification time (a replaced image changes it)."""
        h = hashlib.sha256()
        for i, name in enumerate(self.files):
            st = self.path(i).stat()
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return {**self.source, "n": len(self), "image_size": self.image_size, "files_sha256": h.hexdigest()}
