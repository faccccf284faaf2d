"""OOD data: WaterBirds / image-folder loaders on fixtures in the exact on-disk format, skipped
unreadable images, the OOD datamodule, the shipped word lists."""

import tomllib
from pathlib import Path

import pytest
import torch

from negalign_fixtures import SPLITS_PER_IMAGE, write_placesbg, write_waterbirds
from xclip.data.image_folder import ImageFolder, collate_skipping
from xclip.ood.datamodule import OODDataModule
from xclip.data.shapes import SpuriousShapes
from xclip.ood.vocabulary import builtin_wordlist, read_words, resolve_words
from xclip.ood.waterbirds import WaterBirds

ROOT = Path(__file__).resolve().parents[1]


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


def test_waterbirds_unreadable_image_is_none_and_collate_counts_it(waterbirds):
    ds = WaterBirds(waterbirds, split="test", image_size=32)
    items = [ds[i] for i in range(len(ds))]
    assert items[-1] is None and all(it is not None for it in items[:-1])
    batch = collate_skipping(items)
    assert batch["skipped"] == 1 and batch["image"].shape == (len(items) - 1, 3, 32, 32)
    assert collate_skipping([None, None]) == {"skipped": 2}


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
    dm = OODDataModule(source="waterbirds", root=str(waterbirds), ood_dirs={"placesbg": str(placesbg)},
                       image_size=32, batch_size=4)
    loaders = dm.val_dataloader()
    first = [next(iter(dl)) for dl in loaders]
    assert [(b["split"], b["role"], b["task"]) for b in first] == [
        ("calib", "calib", "ood"), ("id", "id", "ood"), ("ood_placesbg", "ood", "ood")]
    skipped = sum(b["skipped"] for b in loaders[1])
    assert skipped == 1  # the corrupt test image
    with pytest.raises(ValueError, match="ood_dirs"):
        OODDataModule(source="waterbirds", root=str(waterbirds))
    with pytest.raises(ValueError, match="source"):
        OODDataModule(source="imagenet")


def test_ood_datamodule_shapes_sets():
    dm = OODDataModule(n_id=6, n_ood=5, n_calib=4, batch_size=8)
    sets = dm.sets()
    assert [(n, r, len(d)) for n, r, d in sets] == [
        ("calib", "calib", 4), ("id", "id", 6), ("ood_background", "ood", 5), ("ood_novel_shape", "ood", 5)]
    by_name = {n: d for n, _, d in sets}
    assert all(by_name["id"][i]["label"] in (0, 1) for i in range(6))
    assert not any(by_name["ood_background"][i]["mask"].any() for i in range(5))  # nothing but background
    assert all(by_name["ood_novel_shape"][i]["label"] == -1 for i in range(5))
    # calibration and ID come from different sample streams
    assert not torch.equal(by_name["calib"][0]["image"], by_name["id"][0]["image"])
    assert [n for n, _, _ in OODDataModule(n_calib=0).sets()] == ["id", "ood_background", "ood_novel_shape"]


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
