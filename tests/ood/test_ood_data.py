"""OOD data: WaterBirds / image-folder loaders on fixtures in the exact on-disk format, skipped
unreadable images, the OOD datamodule, the shipped word lists."""

from pathlib import Path

import pytest
import tomllib
import torch
from ood_fixtures import SPLITS_PER_IMAGE, write_placesbg, write_waterbirds

from xclip.data.image_folder import ImageFolder, collate_skipping
from xclip.data.shapes import SpuriousShapes
from xclip.ood.datamodule import OODDataModule
from xclip.ood.vocabulary import builtin_wordlist, read_words, resolve_words
from xclip.ood.waterbirds import WaterBirds

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    return write_waterbirds(tmp_path_factory.mktemp("waterbird_complete95_forest2water2"))


@pytest.fixture(scope="module")
def placesbg(tmp_path_factory):
    return write_placesbg(tmp_path_factory.mktemp("placesbg"))


@pytest.mark.parametrize("split, code", [("train", 0), ("val", 1), (2, 2), ("test", 2)])
def test_waterbirds_selects_the_split(waterbirds, split, code):
    ds = WaterBirds(waterbirds, split=split, image_size=32)
    assert len(ds) == SPLITS_PER_IMAGE.count(code)
    ids = [int(r["img_id"]) for r in ds.rows]
    assert ids == [i + 1 for i, s in enumerate(SPLITS_PER_IMAGE) if s == code]


def test_waterbirds_items_match_metadata(waterbirds):
    ds = WaterBirds(waterbirds, split="val", image_size=48)
    truth = SpuriousShapes(n=len(SPLITS_PER_IMAGE), seed=11, image_size=64)
    for item in (ds[i] for i in range(len(ds))):
        assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        source = truth[item["index"] - 1]  # img_id is 1-based
        assert item["label"] == source["label"] and item["place"] == source["place"]
        assert item["path"].split("/")[0].split(".")[0].isdigit()  # 001.Black_footed_Albatross/...


def test_waterbirds_unreadable_image_is_reported_with_its_path_and_collate_counts_it(waterbirds):
    ds = WaterBirds(waterbirds, split="test", image_size=32)
    items = [ds[i] for i in range(len(ds))]
    bad_row = ds.rows[-1]
    assert items[-1] == {"unreadable": True, "index": int(bad_row["img_id"]), "path": bad_row["img_filename"]}
    assert not any(it.get("unreadable") for it in items[:-1])
    batch = collate_skipping(items)
    assert batch["skipped"] == 1 and batch["image"].shape == (len(items) - 1, 3, 32, 32)
    assert batch["skipped_index"].tolist() == [int(bad_row["img_id"])]
    assert batch["skipped_paths"] == [bad_row["img_filename"]]
    only_bad = collate_skipping([items[-1], items[-1]])
    assert set(only_bad) == {"skipped", "skipped_index", "skipped_paths"} and only_bad["skipped"] == 2


def test_waterbirds_errors_name_the_problem(tmp_path, waterbirds):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        WaterBirds(tmp_path)
    (tmp_path / "metadata.csv").write_text("img_id,img_filename,y\n1,a.jpg,0\n")
    with pytest.raises(ValueError, match=r"split.*place"):
        WaterBirds(tmp_path)
    with pytest.raises(ValueError, match="split"):
        WaterBirds(waterbirds, split="dev")


def test_image_folder_is_recursive_and_filters_extensions(placesbg):
    ds = ImageFolder(placesbg, image_size=40)
    names = [p.relative_to(placesbg).as_posix() for p in ds.files]
    assert len(ds) == 7 and "README.txt" not in names and "water/deep/extra.PNG" in names
    assert names == sorted(names)
    item = ds[0]
    assert item["image"].shape == (3, 40, 40) and item["label"] == -1 and item["path"] == names[0]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(tmp_path)


def test_ood_datamodule_waterbirds_tags_batches(waterbirds, placesbg):
    dm = OODDataModule(
        source="waterbirds",
        data_root=str(waterbirds),
        ood_dirs={"placesbg": str(placesbg)},
        image_size=32,
        batch_size=4,
    )

    def tags(loaders):
        return [(b["split"], b["role"], b["partition"], b["task"]) for b in (next(iter(dl)) for dl in loaders)]

    assert tags(dm.val_dataloader()) == [
        ("calib", "calib", "val", "ood"),
        ("id", "id", "val", "ood"),
        ("ood_placesbg", "ood", "val", "ood"),
    ]
    test_loaders = dm.test_dataloader()
    assert tags(test_loaders) == [
        ("calib", "calib", "val", "ood"),
        ("id", "id", "val", "ood"),
        ("ood_placesbg", "ood", "val", "ood"),
        ("id", "id", "test", "ood"),
        ("ood_placesbg", "ood", "test", "ood"),
    ]
    # ID: WaterBirds' own splits (2 train = calibration, 3 val, 7 test); the corrupt image is in test
    sizes = [sum(len(b.get("index", [])) + b["skipped"] for b in dl) for dl in test_loaders]
    assert sizes == [2, 3, 3, 7, 4]  # placesbg's 7 images divided 3 (val) / 4 (test: round(0.5 * 7))
    assert sum(b["skipped"] for b in test_loaders[3]) == 1
    # the two parts of the OOD folder are disjoint and cover it
    val_paths = {p for b in test_loaders[2] for p in b["path"]}
    test_paths = {p for b in test_loaders[4] for p in b["path"]}
    assert not val_paths & test_paths and len(val_paths | test_paths) == 7
    with pytest.raises(ValueError, match="ood_dirs"):
        OODDataModule(source="waterbirds", data_root=str(waterbirds))
    with pytest.raises(ValueError, match="source"):
        OODDataModule(source="imagenet")
    with pytest.raises(ValueError, match="calib_split 'val' is also an evaluated split"):
        OODDataModule(source="waterbirds", data_root=str(waterbirds), ood_dirs={"p": str(placesbg)}, calib_split="val")


def test_ood_datamodule_shapes_sets():
    dm = OODDataModule(n_id=6, n_ood=5, n_calib=4, batch_size=8)
    sets = dm.sets("val")
    assert [(n, r, len(d)) for n, r, d in sets] == [
        ("id", "id", 6),
        ("ood_background", "ood", 5),
        ("ood_novel_shape", "ood", 5),
    ]
    assert len(dm.calibration_set()) == 4
    by_name = {n: d for n, _, d in sets}
    assert all(by_name["id"][i]["label"] in (0, 1) for i in range(6))
    assert not any(by_name["ood_background"][i]["mask"].any() for i in range(5))  # nothing but background
    assert all(by_name["ood_novel_shape"][i]["label"] == -1 for i in range(5))
    # calibration and ID come from different sample streams
    assert not torch.equal(dm.calibration_set()[0]["image"], by_name["id"][0]["image"])
    assert OODDataModule(n_calib=0).calibration_set() is None
    assert [
        b["split"] for b in (next(iter(dl)) for dl in OODDataModule(n_calib=0, n_id=2, n_ood=2).val_dataloader())
    ] == ["id", "ood_background", "ood_novel_shape"]
    # the test partition: the same sets, drawn from ShapesWorld's test key family
    test_sets = {n: d for n, _, d in dm.sets("test")}
    for name, ds in by_name.items():
        assert test_sets[name].split == "test" and ds.split == "val"
        assert not torch.equal(test_sets[name][0]["image"], ds[0]["image"])


def test_shipped_word_lists_have_object_and_scene_words_but_no_id_class():
    nouns, adjs = read_words(builtin_wordlist("nouns")), read_words(builtin_wordlist("adjectives"))
    assert len(nouns) >= 300 and len(adjs) >= 150
    assert {"water", "land", "sky", "sand", "beach", "forest"} <= set(nouns)  # scene-like
    assert {"dog", "car", "chair", "apple", "triangle"} <= set(nouns)  # object-like
    assert {"square", "circle"}.isdisjoint(nouns + adjs)
    assert len(set(nouns)) == len(nouns)
    # shipped as package data
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "wordlists/*.txt" in data["xclip.ood"]


def test_word_list_resolution(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="`nouns`"):
        resolve_words(str(empty), "nouns", "nouns")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_words(str(tmp_path / "missing.txt"), "nouns", "nouns")
    assert resolve_words([" a", "b", "a", ""], "nouns", "nouns") == ["a", "b"]
    assert resolve_words(None, "nouns", "nouns") == read_words(builtin_wordlist("nouns"))
