"""Loaders for the CIR datasets' on-disk formats (as SEARLE reads them). Each returns a
`FileCIRBenchmark`; a malformed entry raises `CIRAnnotationError` naming the file, the entry's
index (and id) and the field; an image file that is missing raises FileNotFoundError naming it
and the entry that needs it. Also refused: a repeated CIRR ``pairid`` / CIRCO ``id`` (submission
entries would overwrite each other), a repeated CIRCO ground truth (mAP would count it twice), a
CIRR target equal to its reference (removed from its own ranking: never found) and a FashionIQ
caption with nothing left once ``.?, `` are stripped.

- CIRR (``root`` = the dataset folder): ``cirr/captions/cap.rc2.{train,val,test1}.json``
  (entries: ``reference``, ``target_hard`` (not in test1), ``caption``, ``img_set.members``,
  ``pairid``) and ``cirr/image_splits/split.rc2.{split}.json`` (image name -> path relative to
  ``root``, ``./dev/dev-0-0-img0.png``). The gallery is every image of the split.
- CIRCO: ``annotations/{val,test}.json`` (``id``, ``reference_img_id``, ``target_img_id``,
  ``relative_caption``, ``shared_concept``, ``gt_img_ids``; test without target and ground truths)
  and the gallery ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` (``images``:
  ``id``, ``file_name``) with images in ``COCO2017_unlabeled/unlabeled2017/``.
- FashionIQ: ``captions/cap.{dress,shirt,toptee}.{split}.json`` (``candidate``, ``target``,
  ``captions`` [2]), ``image_splits/split.{category}.{split}.json`` (image names) and
  ``images/{name}.jpg``. Each category is ranked in its own gallery (keys ``category/name``).

Images are padded to 1.25 : 1 as SEARLE's "targetpad" preprocessing does (``pad_ratio=None``:
plain CLIP resize + centre crop).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xclip.cir.benchmark import CIRQuery, FileCIRBenchmark
from xclip.cir.query import FASHIONIQ_STRIP

CIRR_SPLITS = {"train": "train", "val": "val", "test": "test1", "test1": "test1"}
CIRCO_SPLITS = ("val", "test")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


class CIRAnnotationError(ValueError):
    """A CIR annotation file is malformed (the message names the file, the entry and the field)."""


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} annotations not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CIRAnnotationError(f"{path}: not valid JSON ({err})") from None


def _field(entry: Any, name: str, kind: type, path: Path, where: str) -> Any:
    """entry[name] checked to be a `kind` (a non-empty string for str)."""
    if not isinstance(entry, dict):
        raise CIRAnnotationError(f"{path}: {where} is a {type(entry).__name__}, expected an object")
    if name not in entry:
        raise CIRAnnotationError(f"{path}: {where} has no {name!r} field")
    value = entry[name]
    if kind is int and isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CIRAnnotationError(f"{path}: {where} field {name!r} must be {kind.__name__}, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise CIRAnnotationError(f"{path}: {where} field {name!r} is empty")
    return value


def _str_list(entry: dict, name: str, path: Path, where: str, length: int | None = None) -> list[str]:
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise CIRAnnotationError(f"{path}: {where} field {name!r} must be a list of names, got {value!r}")
    if length is not None and len(value) != length:
        raise CIRAnnotationError(f"{path}: {where} field {name!r} must hold {length} items, got {len(value)}")
    return [str(v) for v in value]


def _check_unique_id(seen: dict[int, int], value: int, index: int, path: Path, field: str) -> None:
    """Refuse a query id seen at an earlier entry (``seen``: id -> entry index, updated)."""
    if value in seen:
        raise CIRAnnotationError(
            f"{path}: entry [{index}] repeats {field} {value} of entry [{seen[value]}]: each "
            f"query needs its own {field} (the submission file is keyed by it)"
        )
    seen[value] = index


def _check_files(root: Path, files: dict[str, str], needed: Sequence[tuple[str, str]], listing: Path) -> None:
    """Every (key, who needs it) must name an existing file: the first missing one is an error."""
    for key, who in needed:
        path = root / files[key]
        if not path.is_file():
            raise FileNotFoundError(
                f"image {key!r} ({path}) is missing; it is listed in {listing}"
                f"{' and needed by ' + who if who else ''}: check the dataset root ({root})"
            )


def _known(key: str, files: dict[str, str], path: Path, where: str, field: str, listing: Path) -> str:
    if key not in files:
        raise CIRAnnotationError(f"{path}: {where} field {field!r} names image {key!r}, which {listing} does not list")
    return key


def load_cirr(
    root: str | Path,
    split: str = "val",
    image_size: int = 224,
    annotation_dir: str = "cirr",
    pad_ratio: float | None = 1.25,
) -> FileCIRBenchmark:
    """CIRR's `split` (``val``, ``test1``/``test``, ``train``) as a benchmark (see the module docstring)."""
    if split not in CIRR_SPLITS:
        raise ValueError(f"CIRR split must be one of {sorted(CIRR_SPLITS)}, got {split!r}")
    split = CIRR_SPLITS[split]
    root = Path(root)
    captions_path = root / annotation_dir / "captions" / f"cap.rc2.{split}.json"
    listing = root / annotation_dir / "image_splits" / f"split.rc2.{split}.json"
    entries = _read_json(captions_path, "CIRR")
    files = _read_json(listing, "CIRR image split")
    if not isinstance(entries, list):
        raise CIRAnnotationError(f"{captions_path}: expected a list of triplets, got {type(entries).__name__}")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CIRAnnotationError(f"{listing}: expected an object mapping image names to relative paths")
    queries, needed = [], []
    pairids: dict[int, int] = {}  # pairid -> entry index
    for i, entry in enumerate(entries):
        pair = entry.get("pairid") if isinstance(entry, dict) else None
        where = f"entry [{i}]" + (f" (pairid {pair})" if pair is not None else "")
        pairid = _field(entry, "pairid", int, captions_path, where)
        _check_unique_id(pairids, pairid, i, captions_path, "pairid")
        reference = _known(
            _field(entry, "reference", str, captions_path, where), files, captions_path, where, "reference", listing
        )
        caption = _field(entry, "caption", str, captions_path, where)
        img_set = entry.get("img_set")
        if not isinstance(img_set, dict):
            raise CIRAnnotationError(f"{captions_path}: {where} field 'img_set' must be an object with 'members'")
        members = tuple(
            _known(m, files, captions_path, where, "img_set.members", listing)
            for m in _str_list(img_set, "members", captions_path, f"{where} img_set")
        )
        target = None
        if split != "test1":
            target = _known(
                _field(entry, "target_hard", str, captions_path, where),
                files,
                captions_path,
                where,
                "target_hard",
                listing,
            )
            if target not in members:
                raise CIRAnnotationError(f"{captions_path}: {where} target {target!r} is not in img_set.members")
            if target == reference:
                raise CIRAnnotationError(
                    f"{captions_path}: {where} field 'target_hard' is the query's own reference "
                    f"{reference!r}: CIRR removes the reference from its ranking, so this "
                    "query could never be answered (fix or drop the entry)"
                )
        queries.append(
            CIRQuery(reference=reference, captions=(caption,), target=target, members=members, query_id=str(pairid))
        )
        needed.append((reference, f"{captions_path.name} {where}"))
    _check_files(root, files, needed, listing)
    _check_files(root, files, [(k, "") for k in files], listing)
    return FileCIRBenchmark(
        "cirr",
        split,
        root,
        files,
        list(files),
        queries,
        image_size,
        source={"captions": str(captions_path.resolve())},
        pad_ratio=pad_ratio,
    )


def load_circo(
    root: str | Path, split: str = "val", image_size: int = 224, pad_ratio: float | None = 1.25
) -> FileCIRBenchmark:
    """CIRCO's `split` (``val`` or ``test``) over the COCO 2017 unlabeled gallery."""
    if split not in CIRCO_SPLITS:
        raise ValueError(f"CIRCO split must be one of {CIRCO_SPLITS}, got {split!r}")
    root = Path(root)
    ann_path = root / "annotations" / f"{split}.json"
    info_path = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    entries, info = _read_json(ann_path, "CIRCO"), _read_json(info_path, "COCO 2017 unlabeled image info")
    if not isinstance(entries, list):
        raise CIRAnnotationError(f"{ann_path}: expected a list of queries, got {type(entries).__name__}")
    if not isinstance(info, dict) or not isinstance(info.get("images"), list):
        raise CIRAnnotationError(f"{info_path}: expected {{'images': [{{'id', 'file_name'}}, ...]}}")
    files: dict[str, str] = {}
    for i, image in enumerate(info["images"]):
        key = str(_field(image, "id", int, info_path, f"images[{i}]"))
        if key in files:
            raise CIRAnnotationError(f"{info_path}: images[{i}] repeats image id {key}")
        files[key] = str(
            Path("COCO2017_unlabeled") / "unlabeled2017" / _field(image, "file_name", str, info_path, f"images[{i}]")
        )
    queries, needed = [], []
    query_ids: dict[int, int] = {}  # id -> entry index
    for i, entry in enumerate(entries):
        qid = entry.get("id") if isinstance(entry, dict) else None
        where = f"entry [{i}]" + (f" (id {qid})" if qid is not None else "")
        query_id = _field(entry, "id", int, ann_path, where)
        _check_unique_id(query_ids, query_id, i, ann_path, "id")
        reference = _known(
            str(_field(entry, "reference_img_id", int, ann_path, where)),
            files,
            ann_path,
            where,
            "reference_img_id",
            info_path,
        )
        caption = _field(entry, "relative_caption", str, ann_path, where)
        target: str | None = None
        ground_truth: tuple[str, ...] = ()
        if split == "val":
            target = _known(
                str(_field(entry, "target_img_id", int, ann_path, where)),
                files,
                ann_path,
                where,
                "target_img_id",
                info_path,
            )
            ground_truth = tuple(
                _known(g, files, ann_path, where, "gt_img_ids", info_path)
                for g in _str_list(entry, "gt_img_ids", ann_path, where)
            )
            if not ground_truth or ground_truth[0] != target:
                raise CIRAnnotationError(f"{ann_path}: {where} gt_img_ids must start with target_img_id {target}")
            repeated = [g for j, g in enumerate(ground_truth) if g in ground_truth[:j]]
            if repeated:
                raise CIRAnnotationError(
                    f"{ann_path}: {where} field 'gt_img_ids' lists image {repeated[0]} more than "
                    "once: list each ground truth once (mAP would count a repeat as another "
                    "ground truth)"
                )
        queries.append(
            CIRQuery(
                reference=reference,
                captions=(caption,),
                target=target,
                ground_truth=ground_truth,
                query_id=str(query_id),
            )
        )
        needed.append((reference, f"{ann_path.name} {where}"))
    _check_files(root, files, needed, info_path)
    _check_files(root, files, [(k, "") for k in files], info_path)
    return FileCIRBenchmark(
        "circo",
        split,
        root,
        files,
        list(files),
        queries,
        image_size,
        source={"annotations": str(ann_path.resolve())},
        pad_ratio=pad_ratio,
    )


def load_fashioniq(
    root: str | Path,
    split: str = "val",
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    image_size: int = 224,
    image_ext: str = "jpg",
    pad_ratio: float | None = 1.25,
) -> FileCIRBenchmark:
    """FashionIQ's `split` for `categories`; each category is ranked within its own gallery."""
    root = Path(root)
    unknown = [c for c in categories if c not in FASHIONIQ_CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"FashionIQ categories must be among {FASHIONIQ_CATEGORIES}, got {list(categories)}")
    files: dict[str, str] = {}
    gallery, gallery_cat, queries, needed = [], [], [], []
    for cat in categories:
        cap_path = root / "captions" / f"cap.{cat}.{split}.json"
        listing = root / "image_splits" / f"split.{cat}.{split}.json"
        entries, names = _read_json(cap_path, "FashionIQ"), _read_json(listing, "FashionIQ image split")
        if not isinstance(entries, list):
            raise CIRAnnotationError(f"{cap_path}: expected a list of triplets, got {type(entries).__name__}")
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise CIRAnnotationError(f"{listing}: expected a list of image names")
        for name in names:
            key = f"{cat}/{name}"
            if key in files:
                raise CIRAnnotationError(f"{listing}: image {name!r} is listed twice")
            files[key] = f"images/{name}.{image_ext}"
            gallery.append(key)
            gallery_cat.append(cat)
        for i, entry in enumerate(entries):
            where = f"entry [{i}]"
            reference = f"{cat}/{_field(entry, 'candidate', str, cap_path, where)}"
            files.setdefault(reference, f"images/{reference.split('/', 1)[1]}.{image_ext}")
            captions = _str_list(entry, "captions", cap_path, where, length=2)
            for j, caption in enumerate(captions):  # the query strips these characters (SEARLE's FashionIQ prompt)
                if not caption.strip(FASHIONIQ_STRIP):
                    raise CIRAnnotationError(
                        f"{cap_path}: {where} field 'captions'[{j}] is {caption!r}: nothing is "
                        f"left once {FASHIONIQ_STRIP!r} are stripped; write the change it asks "
                        "for (e.g. 'is longer') or drop the entry"
                    )
            target = None
            if isinstance(entry, dict) and "target" in entry:
                target = _known(
                    f"{cat}/{_field(entry, 'target', str, cap_path, where)}", files, cap_path, where, "target", listing
                )
            queries.append(
                CIRQuery(
                    reference=reference, captions=tuple(captions), target=target, query_id=f"{cat}/{i}", category=cat
                )
            )
            needed.append((reference, f"{cap_path.name} {where}"))
    _check_files(root, files, needed, root / "images")
    _check_files(root, files, [(k, "") for k in gallery], root / "image_splits")
    return FileCIRBenchmark(
        "fashioniq",
        split,
        root,
        files,
        gallery,
        queries,
        image_size,
        gallery_categories=gallery_cat,
        source={"categories": list(categories)},
        pad_ratio=pad_ratio,
    )
