"""COCO captions and Karpathy split loaders on fixtures in the exact on-disk formats (ShapesWorld
images written as JPEGs): order, seeded subsets, image preprocessing, errors that name the entry."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from file_fixtures import IDS, write_coco, write_image
from PIL import Image

from xclip.data.shapes import generate
from xclip.metrics import retrieval_recall_at_k
from xclip.retrieval import AnnotationError, RetrievalDataModule, RetrievalModule, load_coco_captions, load_karpathy


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path)


def rewrite_coco(root, edit):
    path = root / "annotations" / "captions_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_coco_gallery_order_captions_and_images(coco):
    g = load_coco_captions(coco, n=None, image_size=48)
    order = sorted(IDS)
    assert g.keys() == [f"{i:012d}.jpg" for i in order]
    for pos, image_id in enumerate(order):
        k = IDS.index(image_id)
        sample = generate(seed=9, index=k, size=64)
        # both captions, whitespace stripped, in file order (the file lists each image's 2nd caption first)
        assert g.captions(pos) == sample.captions[::-1]
        img = g.image(pos)
        assert img.shape == (3, 48, 48) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        # shorter side 64 -> 48, width 80 -> 60, centre crop 48: compare with the same geometry
        src = torch.from_numpy(np.array(Image.open(coco / "val2017" / g.key(pos)))).permute(2, 0, 1).float() / 255
        want = F.interpolate(src[None], size=(48, 60), mode="bicubic", antialias=True)[0, :, :, 6:54]
        assert (img - want).abs().mean() < 0.02
    texts, owner = g.all_captions()
    assert len(texts) == 12 and owner.tolist() == [i for i in range(6) for _ in range(2)]


def test_coco_seeded_subset(coco):
    a = load_coco_captions(coco, n=3, seed=0, image_size=32)
    assert len(a) == 3 and a.keys() == load_coco_captions(coco, n=3, seed=0, image_size=32).keys()
    assert a.keys() == sorted(a.keys())  # kept in id order
    subsets = {tuple(load_coco_captions(coco, n=3, seed=s, image_size=32).keys()) for s in range(6)}
    assert len(subsets) > 1  # the seed matters
    assert a.fingerprint() != load_coco_captions(coco, n=3, seed=1, image_size=32).fingerprint()
    assert a.fingerprint()["subset_seed"] == 0 and a.fingerprint()["n"] == 3


def test_coco_missing_image_names_file_and_entry(coco):
    (coco / "val2017" / f"{139:012d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"000000000139\.jpg.*image id 139.*captions_val2017\.json"):
        load_coco_captions(coco, n=None)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][3].pop("caption"), r"annotations\[3\] \(id \d+\) has no 'caption'"),
        (lambda d: d["annotations"][2].update(image_id=5), r"annotations\[2\] \(id \d+\) refers to image id 5"),
        (lambda d: d["images"][1].pop("file_name"), r"images\[1\] has no 'file_name'"),
        (lambda d: d["images"][4].update(id="x"), r"images\[4\] has a malformed 'id'"),
        (lambda d: d.pop("annotations"), r"no 'annotations' list"),
    ],
)
def test_coco_malformed_annotation_names_file_and_entry(coco, edit, message):
    rewrite_coco(coco, edit)
    with pytest.raises(AnnotationError, match=message) as err:
        load_coco_captions(coco)
    assert "captions_val2017.json" in str(err.value)


def test_coco_invalid_json_and_missing_file(coco, tmp_path):
    (coco / "annotations" / "captions_val2017.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="captions_val2017.json: not valid JSON"):
        load_coco_captions(coco)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_coco_captions(coco, annotations="nowhere.json")


@pytest.fixture
def karpathy(tmp_path):
    entries = []
    for k, image_id in enumerate(IDS):
        folder = "val2014" if k % 2 else "train2014"
        name = f"COCO_{folder}_{image_id:012d}.jpg"
        write_image(tmp_path / folder / name, k)
        caps = generate(seed=9, index=k, size=64).captions
        entries.append(
            {
                "filepath": folder,
                "filename": name,
                "imgid": k,
                "split": "test" if k < 4 else "val",
                "sentids": [0, 1],
                "cocoid": image_id,
                "sentences": [{"tokens": c.split(), "raw": c, "imgid": k, "sentid": j} for j, c in enumerate(caps)],
            }
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return tmp_path


def test_karpathy_split_in_file_order(karpathy):
    g = load_karpathy(karpathy, split="test", image_size=32)
    assert g.keys() == [
        "train2014/COCO_train2014_000000000397.jpg",
        "val2014/COCO_val2014_000000000042.jpg",
        "train2014/COCO_train2014_000000000139.jpg",
        "val2014/COCO_val2014_000000000785.jpg",
    ]
    assert g.captions(1) == generate(seed=9, index=1, size=64).captions
    assert g.image(3).shape == (3, 32, 32)
    assert len(load_karpathy(karpathy, split="val")) == 2
    assert len(load_karpathy(karpathy, split="test", n=2, seed=3)) == 2
    assert g.fingerprint()["split"] == "test"


def test_karpathy_errors_name_the_entry(karpathy):
    path = karpathy / "dataset_coco.json"
    data = json.loads(path.read_text())
    data["images"][2]["sentences"][1] = {"tokens": []}
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"dataset_coco\.json: images\[2\] \(cocoid 139\) sentences\[1\]"):
        load_karpathy(karpathy)
    with pytest.raises(ValueError, match="unknown Karpathy split 'dev'"):
        load_karpathy(karpathy, split="dev")
    data["images"][2]["sentences"][1] = {"raw": "ok"}
    path.write_text(json.dumps(data))
    (karpathy / "val2014" / "COCO_val2014_000000000785.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"COCO_val2014_000000000785\.jpg \(images\[3\] \(cocoid 785\)"):
        load_karpathy(karpathy)


def test_retrieval_on_the_coco_fixture_equals_direct_computation(coco):
    module = RetrievalModule("xclip:tiny-shapes")
    data = RetrievalDataModule(source="coco", data_root=str(coco), n=None, image_size=64, batch_size=4)
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, datamodule=data, verbose=False
    )
    g, bb = data.gallery, module.backbone
    texts, owner = g.all_captions()
    with torch.no_grad():
        img = bb.encode_image(bb.normalize(torch.stack([g.image(i) for i in range(len(g))])), normalize=True)
        txt = bb.encode_text(texts, normalize=True)
    assert module.recall_values == {f"val/retrieval/{k}": v for k, v in retrieval_recall_at_k(img, txt, owner).items()}
    assert module.recall_values["val/retrieval/t2i_R@10"] == 1.0  # 6 images: every caption's image is in the top 10


def test_file_gallery_fingerprint_tracks_files_and_bad_images_are_named(coco):
    g = load_coco_captions(coco, n=None, image_size=32)
    before = g.fingerprint()
    assert before == load_coco_captions(coco, n=None, image_size=32).fingerprint()
    assert before != load_coco_captions(coco, n=None, image_size=48).fingerprint()
    bad = coco / "val2017" / g.key(2)
    bad.write_bytes(b"not a jpeg")  # replaced on disk: the cache key must change
    assert g.fingerprint()["files_sha256"] != before["files_sha256"]
    with pytest.raises(OSError, match=rf"{g.key(2)}: gallery image 2 cannot be decoded"):
        g.image(2)
    bad.unlink()
    with pytest.raises(FileNotFoundError, match=rf"gallery image 2 \('{g.key(2)}'\) is missing"):
        g[2]
