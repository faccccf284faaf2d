"""CaptionGallery contract on ShapesWorld: frozen order, scenes behind captions, collate compatibility."""

import torch
from torch.utils.data import DataLoader

from xclip.data.shapes import ShapesCaptions, caption
from xclip.data.shapes.datamodule import collate_captions
from xclip.retrieval.gallery import ShapesGallery


def test_shapes_gallery_matches_shapes_captions_and_scenes():
    g = ShapesGallery(n=6, seed=7, image_size=32, captions_per_image=2)
    ref = ShapesCaptions(n=6, seed=7, image_size=32, captions_per_image=2)
    assert len(g) == 6
    for i in range(6):
        item, want = g[i], ref[i]
        assert item["index"] == i and item["captions"] == want["captions"] == g.captions(i)
        assert torch.equal(item["image"], want["image"]) and item["image"].shape == (3, 32, 32)
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert g.scene(i) == ref.sample(i).scene
        assert g.captions(i) == [caption(g.scene(i), v) for v in range(2)]
    assert len(set(g.keys())) == 6 and g.key(3) == "shapes:7:3"


def test_all_captions_order_and_owner():
    g = ShapesGallery(n=5, seed=1, image_size=16, captions_per_image=3)
    texts, owner = g.all_captions()
    assert owner.tolist() == [i for i in range(5) for _ in range(3)]
    assert texts == [c for i in range(5) for c in g.captions(i)]


def test_fingerprint_changes_with_subset_and_size():
    a = ShapesGallery(n=5, seed=1, image_size=16).fingerprint()
    assert a == ShapesGallery(n=5, seed=1, image_size=16).fingerprint()
    assert a != ShapesGallery(n=6, seed=1, image_size=16).fingerprint()
    assert a != ShapesGallery(n=5, seed=2, image_size=16).fingerprint()
    assert a != ShapesGallery(n=5, seed=1, image_size=32).fingerprint()


def test_gallery_batches_with_collate_captions():
    g = ShapesGallery(n=5, seed=1, image_size=16, captions_per_image=2)
    batches = list(DataLoader(g, batch_size=2, collate_fn=collate_captions))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[1]["texts"] == g.captions(2) + g.captions(3)
    assert batches[1]["text_to_image"].tolist() == [0, 0, 1, 1]
