"""A CIR benchmark in one shape: a gallery of images (frozen order) and queries (a reference
image, one or two relative captions, the target(s)), for ShapesWorld and the on-disk datasets.

`CIRBenchmark` is what the datamodule serves and the module scores: gallery images by index,
query references by index, and the per-query bookkeeping as gallery indices (targets, CIRR's
``img_set.members``, CIRCO's ground truths, FashionIQ's category). Loaders for CIRR, CIRCO and
FashionIQ build `FileCIRBenchmark`s (`xclip.cir.loaders`); `ShapesCIRBenchmark` renders
ShapesWorld triplets and knows the truth the explanations are judged against.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from xclip.cir.concepts import scene_concepts
from xclip.data.images import ImageReadError, read_rgb, resize_center_crop
from xclip.data.shapes import CIR_KINDS, ShapesCIR, ShapesCIRCO, image_tensor
from xclip.data.shapes.render import object_mask
from xclip.data.shapes.scene import Scene

log = logging.getLogger(__name__)


def target_pad(image: Image.Image, ratio: float = 1.25) -> Image.Image:
    """SEARLE's "targetpad": an image longer than `ratio` : 1 is padded with black on both sides
    of its short axis to that ratio (then CLIP's resize + centre crop keeps all of it)."""
    w, h = image.size
    if max(w, h) / min(w, h) < ratio:
        return image
    side = max(w, h) / ratio
    hp, vp = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
    return ImageOps.expand(image, border=(hp, vp, hp, vp), fill=0)


def load_cir_image(path: str | Path, image_size: int, pad_ratio: float | None = 1.25) -> Tensor | None:
    """[3, S, S] in [0, 1]: `xclip.data.images.read_rgb`, SEARLE's target pad (None: none), then
    the shorter side resized to S and centre-cropped; None (logged) when the file cannot be read."""
    try:
        image = read_rgb(path)
    except ImageReadError as err:
        log.warning("skipping unreadable image: %s", err)
        return None
    return resize_center_crop(target_pad(image, pad_ratio) if pad_ratio else image, image_size)


@dataclass(frozen=True)
class CIRQuery:
    """One composed query, by image keys. ``target`` is None where the split hides it (test
    splits); ``members`` = CIRR's ``img_set.members``; ``ground_truth`` = CIRCO's ``gt_img_ids``
    (the target first); ``query_id`` = CIRR's ``pairid`` / CIRCO's ``id``; ``category`` =
    FashionIQ's dress / shirt / toptee."""

    reference: str
    captions: tuple[str, ...]
    target: str | None = None
    members: tuple[str, ...] = ()
    ground_truth: tuple[str, ...] = ()
    query_id: str = ""
    category: str = ""


class CIRBenchmark:
    """Gallery + queries of one split. Subclasses supply the images.

    Attributes:
        name: ``shapes``, ``cirr``, ``circo`` or ``fashioniq``.
        split: the split's name in the dataset (``val``, ``test1``, ...).
        gallery_keys: image keys in gallery order.
        queries: the queries in order (a query's index is its position).
        gallery_categories: per gallery image, the category it is ranked in ('' = one gallery).
    """

    name = "cir"

    def __init__(
        self, split: str, gallery_keys: list[str], queries: list[CIRQuery], gallery_categories: list[str] | None = None
    ):
        self.split, self.gallery_keys, self.queries = split, list(gallery_keys), list(queries)
        self.gallery_categories = (
            list(gallery_categories) if gallery_categories is not None else [""] * len(gallery_keys)
        )
        self._index = {k: i for i, k in enumerate(self.gallery_keys)}
        if len(self._index) != len(self.gallery_keys):
            raise ValueError(f"{self.name} {split}: the gallery repeats image keys")

    # ---- images (subclasses) --------------------------------------------------------------
    def gallery_image(self, index: int) -> Tensor | None:
        """Gallery image `index` as [3, S, S] in [0, 1], or None when the file cannot be read."""
        raise NotImplementedError

    def reference_image(self, query: int) -> Tensor | None:
        """The reference image of query `query` ([3, S, S] in [0, 1]) or None when unreadable."""
        raise NotImplementedError

    def gallery_path(self, index: int) -> str:
        """Where gallery image `index` comes from (a file path, or a ShapesWorld description)."""
        return self.gallery_keys[index]

    def reference_path(self, query: int) -> str:
        return self.queries[query].reference

    def fingerprint(self) -> dict:
        """JSON-able identity of the gallery (part of the embedding cache key)."""
        raise NotImplementedError

    # ---- bookkeeping as gallery indices ---------------------------------------------------
    def __len__(self) -> int:
        return len(self.queries)

    @property
    def n_gallery(self) -> int:
        return len(self.gallery_keys)

    def index_of(self, key: str) -> int:
        """Gallery index of an image key (-1 when the image is not in the gallery)."""
        return self._index.get(key, -1)

    def has_targets(self) -> bool:
        return bool(self.queries) and all(q.target is not None for q in self.queries)

    def target_index(self) -> Tensor:
        """[Q] long: each query's target in the gallery (-1 when hidden)."""
        return torch.tensor(
            [self.index_of(q.target) if q.target is not None else -1 for q in self.queries], dtype=torch.long
        )

    def reference_index(self) -> Tensor:
        """[Q] long: each query's reference in the gallery (-1 when it is not a gallery image)."""
        return torch.tensor([self.index_of(q.reference) for q in self.queries], dtype=torch.long)

    def members_index(self) -> Tensor:
        """[Q, M] long: CIRR's ``img_set.members`` as gallery indices, padded with -1."""
        width = max((len(q.members) for q in self.queries), default=0)
        out = torch.full((len(self.queries), width), -1, dtype=torch.long)
        for i, q in enumerate(self.queries):  # bookkeeping, no model work
            out[i, : len(q.members)] = torch.tensor([self.index_of(m) for m in q.members], dtype=torch.long)
        return out

    def ground_truth_index(self) -> list[list[int]]:
        """CIRCO's ground truths as gallery indices, per query."""
        return [[self.index_of(g) for g in q.ground_truth] for q in self.queries]

    def categories(self) -> list[str]:
        return sorted({q.category for q in self.queries})


class FileCIRBenchmark(CIRBenchmark):
    """Images on disk: ``files[key]`` is each image's path relative to `root`.

    Images are read with `load_cir_image` (`xclip.data.images`, SEARLE's target pad to 1.25 : 1
    unless `pad_ratio` is None, shorter side resized to `image_size`, centre crop); an unreadable
    file gives None (the datasets turn it into a skipped item).
    """

    def __init__(
        self,
        name: str,
        split: str,
        root: str | Path,
        files: dict[str, str],
        gallery_keys: list[str],
        queries: list[CIRQuery],
        image_size: int = 224,
        gallery_categories: list[str] | None = None,
        source: dict | None = None,
        pad_ratio: float | None = 1.25,
    ):
        self.name = name
        super().__init__(split, gallery_keys, queries, gallery_categories)
        self.root, self.files, self.image_size, self.source = (
            Path(root),
            dict(files),
            int(image_size),
            dict(source or {}),
        )
        self.pad_ratio = pad_ratio

    def file(self, key: str) -> Path:
        return self.root / self.files[key]

    def gallery_path(self, index: int) -> str:
        return str(self.file(self.gallery_keys[index]))

    def reference_path(self, query: int) -> str:
        return str(self.file(self.queries[query].reference))

    def gallery_image(self, index: int) -> Tensor | None:
        return load_cir_image(self.file(self.gallery_keys[index]), self.image_size, self.pad_ratio)

    def reference_image(self, query: int) -> Tensor | None:
        return load_cir_image(self.file(self.queries[query].reference), self.image_size, self.pad_ratio)

    def fingerprint(self) -> dict:
        """Name, split, image size and a digest of every gallery file's key, path, size and mtime."""
        h = hashlib.sha256()
        for key in self.gallery_keys:
            path = self.file(key)
            st = path.stat() if path.exists() else None
            h.update(f"{key}|{self.files[key]}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
        return {
            **self.source,
            "benchmark": self.name,
            "split": self.split,
            "image_size": self.image_size,
            "pad_ratio": self.pad_ratio,
            "n_gallery": self.n_gallery,
            "files_sha256": h.hexdigest(),
        }


@dataclass
class ShapesTruth:
    """Where the answer lies in a ShapesWorld query (masks [S, S] bool).

    ``modified``: the target's objects the caption names as changed (the recoloured, reshaped,
    resized or moved object; both copies for a count edit; the caption's object for a CIRCO-style
    query; empty for a background edit); ``target_other``: the target's other objects; ``shared``:
    reference objects the target keeps unchanged; ``reference_other``: the reference's other objects.
    """

    kind: str
    modified: Tensor
    target_other: Tensor
    shared: Tensor
    reference_other: Tensor


def _union_mask(objects, size: int) -> Tensor:
    out = np.zeros((size, size), bool)
    for o in objects:
        out |= object_mask(o, size)
    return torch.from_numpy(out)


def shapes_truth(reference: Scene, target: Scene, kind: str, size: int) -> ShapesTruth:
    """Masks of the modified / shared objects of a single-edit query from its two scene graphs."""
    added = [o for o in target.objects if o not in reference.objects]
    if kind == "count":  # "two red circles instead of one" names both copies
        nouns = {o.noun for o in added}
        added = [o for o in target.objects if o.noun in nouns]
    kept = [o for o in reference.objects if o in target.objects]
    return ShapesTruth(
        kind,
        _union_mask(added, size),
        _union_mask([o for o in target.objects if o not in added], size),
        _union_mask(kept, size),
        _union_mask([o for o in reference.objects if o not in kept], size),
    )


class ShapesCIRBenchmark(CIRBenchmark):
    """ShapesWorld composed image retrieval with hard negatives (`xclip.data.shapes.ShapesCIR`,
    `ShapesCIRCO`), scored the way CIRR and CIRCO are.

    - ``n`` single-edit queries (CIRR-style): reference set ``r = i // 6`` gives its reference and
      its 6 single-edit variants to the gallery; query ``i`` asks for variant ``i % 6`` by its caption.
      ``members`` (CIRR's ``img_set``) = the 7 images of the set, so Recall_subset@K ranks the 6
      variants once the reference is removed: chance K / 6, and a method blind to the caption (image
      only) scores exactly that when every set is queried once per kind (``n`` a multiple of 6).
      Global Recall@K ranks the whole gallery, the reference removed.
    - ``n_circo`` CIRCO-style queries: a one-object reference (not in the gallery) and a caption that
      several images satisfy ("shows a small blue one on water"); each plants 3 ground truths and 2
      near misses in the gallery, and its ground-truth set is *every* gallery image that satisfies the
      caption (the planted target first). Scored with mAP@K.

    Keys are ``"shapes/<split>/<seed>/set<r>/<slot>"`` (slot ``reference`` or an edit kind) and
    ``"shapes/<split>/<seed>/circo<q>/<slot>"`` (``reference``, ``gt<j>``, ``neg<j>``).
    """

    name = "shapes"
    SUBSET_CHANCE_DENOMINATOR = len(CIR_KINDS)

    def __init__(self, n: int = 600, seed: int = 1000, image_size: int = 64, split: str = "val", n_circo: int = 0):
        if n < 0 or n_circo < 0 or n + n_circo == 0:
            raise ValueError(f"a ShapesWorld CIR benchmark needs queries: got n={n} single-edit and n_circo={n_circo}")
        self.single = ShapesCIR(n=max(n, 1), seed=seed, image_size=image_size, split=split)
        self.circo = ShapesCIRCO(n=max(n_circo, 1), seed=seed, image_size=image_size, split=split)
        self.n_single, self.n_circo = n, n_circo
        self.seed, self.image_size = seed, image_size
        prefix = f"shapes/{split}/{seed}"
        keys: list[str] = []
        self._slots: list[tuple[str, int, int]] = []  # per gallery image: (source, set or query, slot)
        self._scenes: list[Scene] = []
        sets = -(-n // len(CIR_KINDS))
        for r in range(sets):  # scene graphs only (no rendering): captions, keys, ground truths
            cir_set = self.single.reference_set(r)
            for slot, (name, scene) in enumerate(zip(("reference", *CIR_KINDS), cir_set.scenes())):
                keys.append(f"{prefix}/set{r}/{name}")
                self._slots.append(("set", r, slot))
                self._scenes.append(scene)
        for q in range(n_circo):
            cq = self.circo.query(q)
            names = [f"gt{j}" for j in range(len(cq.planted))] + [f"neg{j}" for j in range(len(cq.negatives))]
            for slot, (name, scene) in enumerate(zip(names, cq.scenes()[1:]), start=1):
                keys.append(f"{prefix}/circo{q}/{name}")
                self._slots.append(("circo", q, slot))
                self._scenes.append(scene)
        queries = []
        for i in range(n):
            r, k = divmod(i, len(CIR_KINDS))
            members = tuple(f"{prefix}/set{r}/{name}" for name in ("reference", *CIR_KINDS))
            queries.append(
                CIRQuery(
                    reference=members[0],
                    captions=(self.single.reference_set(r).captions[k],),
                    target=members[1 + k],
                    members=members,
                    query_id=str(i),
                    category=CIR_KINDS[k],
                )
            )
        for q in range(n_circo):
            loose = self.circo.query(q).loose
            target = f"{prefix}/circo{q}/gt0"
            truth = [target] + [
                key for key, scene in zip(keys, self._scenes) if key != target and loose.satisfied_by(scene)
            ]
            queries.append(
                CIRQuery(
                    reference=f"{prefix}/circo{q}/reference",
                    captions=(loose.caption(),),
                    target=target,
                    ground_truth=tuple(truth),
                    query_id=f"circo{q}",
                    category="circo",
                )
            )
        super().__init__(split, keys, queries)

    def is_circo(self, query: int) -> bool:
        return query >= self.n_single

    def gallery_image(self, index: int) -> Tensor:
        source, i, slot = self._slots[index]
        data = self.single if source == "set" else self.circo
        return image_tensor(data.render_slot(i, slot)[0])

    def gallery_scene(self, index: int) -> Scene:
        return self._scenes[index]

    def reference_image(self, query: int) -> Tensor:
        if self.is_circo(query):
            return image_tensor(self.circo.render_slot(query - self.n_single, 0)[0])
        return image_tensor(self.single.render_slot(query // len(CIR_KINDS), 0)[0])

    def target_image(self, query: int) -> Tensor:
        target = self.queries[query].target
        if target is None:
            raise ValueError(f"query {query} has no single target (a CIRCO-style query: use its ground_truth)")
        return self.gallery_image(self.index_of(target))

    def scenes(self, query: int) -> tuple[Scene, Scene, str]:
        """(reference scene, target scene, kind) of a query (kind ``circo`` for CIRCO-style ones)."""
        if self.is_circo(query):
            cq = self.circo.query(query - self.n_single)
            return cq.reference, cq.planted[0], "circo"
        ref, _, tgt, kind = self.single.triplet(query)
        return ref, tgt, kind

    def concepts(self, query: int, kind: str = "shape") -> list[str]:
        """The reference's concepts (OTI's regulariser; see `xclip.cir.concepts`)."""
        return scene_concepts(self.scenes(query)[0], kind)

    def truth(self, query: int) -> ShapesTruth:
        ref, tgt, kind = self.scenes(query)
        if kind != "circo":
            return shapes_truth(ref, tgt, kind, self.image_size)
        loose = self.circo.query(query - self.n_single).loose
        named = [o for o in tgt.objects if (o.shape, o.colour, o.size) == (loose.shape, loose.colour, loose.size)]
        size = self.image_size
        return ShapesTruth(
            kind,
            _union_mask(named, size),
            _union_mask([o for o in tgt.objects if o not in named], size),
            _union_mask([], size),
            _union_mask(ref.objects, size),
        )

    def subset_chance(self, ks: tuple[int, ...] = (1, 2, 3)) -> dict[str, float]:
        """Recall_subset@K of a method that ignores the caption: K / 6 (the variants of a set)."""
        return {f"R_subset@{k}": min(k / self.SUBSET_CHANCE_DENOMINATOR, 1.0) for k in ks}

    def fingerprint(self) -> dict:
        """Sizes, seed, split and a digest of every gallery scene graph (a generator change is a new gallery)."""
        scenes = hashlib.sha256(json.dumps([s.to_dict() for s in self._scenes], sort_keys=True).encode()).hexdigest()
        return {
            "benchmark": "shapes",
            "n": self.n_single,
            "n_circo": self.n_circo,
            "seed": self.seed,
            "image_size": self.image_size,
            "split": self.split,
            "scenes_sha256": scenes,
        }
