"""`xclip test` means held-out data: every ShapesWorld datamodule serves test samples that share no
image with its validation samples (nor with the calibration or training data)."""

import hashlib

import pytest
import torch

from xclip.data import ShapesWorldDataModule
from xclip.data.shapes import ShapesCaptions, sample_rng
from xclip.ood import OODDataModule
from xclip.retrieval import RetrievalDataModule


def digests(images) -> set[str]:
    return {hashlib.sha256((img * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest() for img in images}


def loader_images(loaders, key="image", partition=None) -> set[str]:
    out = set()
    for loader in loaders:
        for batch in loader:
            if partition is None or batch.get("partition") == partition:
                out |= digests(batch[key])
    return out


@pytest.mark.parametrize("task", ["classification", "retrieval", "spurious"])
def test_shapesworld_datamodule_test_split_is_disjoint_from_validation(task):
    dm = ShapesWorldDataModule(val_tasks=[task], n_val=60, batch_size=30, seed=3)
    val, test = loader_images(dm.val_dataloader()), loader_images(dm.test_dataloader())
    assert len(val) > 50 and len(test) > 50  # nearly all distinct images (scenes may repeat by chance)
    assert not val & test
    train = digests(dm.dataset(task, "train")[i]["image"] for i in range(60))
    assert not train & test
    # the test loader serves exactly the test-split dataset
    first = next(iter(dm.test_dataloader()[0]))
    ds = dm.dataset(task, "test")
    assert ds.split == "test" and torch.equal(first["image"][0], ds[0]["image"])


def test_test_keys_never_equal_a_validation_key_whatever_the_seeds():
    # a validation stream of any seed draws different numbers than the test stream of seed 0
    test_draw = sample_rng(0, "captions", 5, "test").integers(0, 2**62, 4)
    for seed in range(0, 3000, 7):
        assert not (sample_rng(seed, "captions", 5, "val").integers(0, 2**62, 4) == test_draw).all()
    with pytest.raises(ValueError, match="split must be one of"):
        sample_rng(0, "captions", 5, "holdout")
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesCaptions(n=2, split="dev")


def test_retrieval_datamodule_test_gallery_is_disjoint_from_validation():
    dm = RetrievalDataModule(source="shapes", n=40, seed=7, batch_size=20)
    dm.setup("validate")
    val = loader_images([dm.val_dataloader()])
    assert dm.gallery.fingerprint()["split"] == "val"
    dm.setup("test")
    test = loader_images([dm.test_dataloader()])
    assert dm.gallery.fingerprint()["split"] == "test" and not val & test and len(test) > 35
    assert dm.gallery.key(0) != dm.gallery_for("val").key(0)  # cache keys differ too


def test_ood_datamodule_test_partition_is_disjoint_from_validation_and_calibration():
    dm = OODDataModule(n_id=30, n_ood=30, n_calib=30, batch_size=30)
    val = loader_images(dm.val_dataloader()[1:])
    test_loaders = dm.test_dataloader()
    selection = loader_images(test_loaders[1:], partition="val")
    test = loader_images(test_loaders[1:], partition="test")
    calib = digests(dm.calibration_set()[i]["image"] for i in range(30))
    assert selection == val  # a test run picks lambda on the very validation sets
    assert not test & val and not test & calib
    # background-only scenes are few and can repeat; ID and novel-shape sets must be disjoint
    assert len(test) > 60
