"""CIRR, CIRCO and FashionIQ folders in their exact on-disk formats, with tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_cirr(root: Path, n_images: int = 9) -> dict:
    """CIRR: cirr/captions/cap.rc2.{val,test1}.json, cirr/image_splits/split.rc2.{val,test1}.json,
    images at ./dev/*.png and ./test1/*.png. Sets of 6 members (reference first)."""
    out = {}
    for split, folder in (("val", "dev"), ("test1", "test1")):
        names = [f"{folder}-{i}-0-img{i % 2}" for i in range(n_images)]
        files = {n: f"./{folder}/{n}.png" for n in names}
        for i, n in enumerate(names):
            _image(root / folder / f"{n}.png", seed=100 * len(split) + i)
        entries = []
        for q in range(5):
            members = [names[(q + j) % n_images] for j in range(6)]
            entry = {
                "pairid": 10 + q,
                "reference": members[0],
                "caption": f"has {q + 1} more dogs",
                "img_set": {"id": q, "members": members},
            }
            if split == "val":
                entry["target_hard"] = members[2]
                entry["target_soft"] = {members[2]: 1.0}
            entries.append(entry)
        (root / "cirr" / "captions").mkdir(parents=True, exist_ok=True)
        (root / "cirr" / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "cirr" / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
        (root / "cirr" / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(files))
        out[split] = (names, entries)
    return out


def write_circo(root: Path, n_images: int = 12) -> dict:
    """CIRCO: annotations/{val,test}.json + COCO2017_unlabeled/{annotations/image_info_unlabeled2017.json,
    unlabeled2017/}."""
    ids = [1000 + 7 * i for i in range(n_images)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
    for k, info in enumerate(images):
        _image(root / "COCO2017_unlabeled" / "unlabeled2017" / info["file_name"], seed=k)
    (root / "COCO2017_unlabeled" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").write_text(
        json.dumps({"images": images})
    )
    val = [
        {
            "id": q,
            "reference_img_id": ids[q],
            "target_img_id": ids[q + 1],
            "relative_caption": f"is {q} times bigger",
            "shared_concept": "a dog",
            "gt_img_ids": [ids[q + 1], ids[q + 3], ids[q + 5]][: 1 + q % 3],
        }
        for q in range(5)
    ]
    test = [
        {"id": 100 + q, "reference_img_id": ids[q], "relative_caption": "is at night", "shared_concept": "a cat"}
        for q in range(3)
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    (root / "annotations" / "test.json").write_text(json.dumps(test))
    return {"ids": ids, "val": val, "test": test}


def write_fashioniq(root: Path, categories=("dress", "shirt", "toptee"), per_category: int = 6) -> dict:
    """FashionIQ: captions/cap.{cat}.val.json, image_splits/split.{cat}.val.json, images/{name}.jpg."""
    out = {}
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    for c, cat in enumerate(categories):
        names = [f"B00{cat[:2].upper()}{i:04d}" for i in range(per_category)]
        for i, n in enumerate(names):
            _image(root / "images" / f"{n}.jpg", seed=50 * c + i, size=(30, 44))
        entries = [
            {"candidate": names[q], "target": names[q + 1], "captions": [f"is more {cat}y.", " has buttons? "]}
            for q in range(3)
        ]
        (root / "captions" / f"cap.{cat}.val.json").write_text(json.dumps(entries))
        (root / "image_splits" / f"split.{cat}.val.json").write_text(json.dumps(names))
        out[cat] = (names, entries)
    return out
