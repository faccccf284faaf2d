"""RetrievalModule: numbers equal a brute-force reference, the embedding cache (hit skips the model
and the images; a changed key or a corrupt file recomputes), ShapesWorldDataModule batches."""

import json
import logging

import lightning.pytorch as pl
import open_clip
import pytest
import torch
from retrieval_problems import brute_force

from xclip.backbones import load_backbone, save_checkpoint
from xclip.data import CombinedDataModule, ShapesWorldDataModule
from xclip.data.embedding_cache import TENSORS_NAME
from xclip.retrieval import RetrievalDataModule, RetrievalModule, ShapesGallery
from xclip.suite import EvaluationSuite

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> str:
    """A random-init tiny CLIP saved as an xclip checkpoint directory (fast to load and run)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(
        open_clip.model.CLIP(**TINY_CFG),
        TINY_CFG,
        {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        32,
        path,
        dtype=torch.float32,
    )
    return str(path)


def validate(module, datamodule, **trainer_kw):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kw
    )
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


def direct_embeddings(backbone, gallery):
    """Image and caption embeddings of the whole gallery in one forward each (no Lightning)."""
    images = torch.stack([gallery.image(i) for i in range(len(gallery))])
    texts, owner = gallery.all_captions()
    with torch.no_grad():
        img = backbone.encode_image(backbone.normalize(images), normalize=True)
        txt = backbone.encode_text(texts, normalize=True)
    return img, txt, owner


def test_module_numbers_equal_brute_force_on_the_shipped_checkpoint():
    module = RetrievalModule("xclip:tiny-shapes")
    data = RetrievalDataModule(source="shapes", n=250, seed=5, image_size=64, batch_size=67)  # uneven batches
    logged = validate(module, data)
    img, txt, owner = direct_embeddings(load_backbone("xclip:tiny-shapes"), data.gallery)
    want = brute_force(img, txt, owner, (1, 5, 10))
    assert module.recall_values == {f"val/retrieval/{k}": v for k, v in want.items()}
    for k, v in want.items():
        assert logged[f"val/retrieval/{k}"] == pytest.approx(v, abs=1e-6)
    r1 = (want["t2i_R@1"], want["i2t_R@1"])
    assert 0.5 < min(r1) < 1.0  # a trained model on a gallery where it still makes mistakes
    emb = module.gallery_embeddings
    torch.testing.assert_close(emb.image_emb, img, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.text_emb, txt, atol=1e-5, rtol=0)
    assert torch.equal(emb.text_to_image, owner) and torch.equal(emb.image_index, torch.arange(250))
    assert module.gallery is data.gallery


def test_shapesworld_datamodule_batches_give_the_gallery_numbers(tiny_spec):
    a = RetrievalModule(tiny_spec)
    validate(a, ShapesWorldDataModule(val_tasks=["retrieval"], image_size=32, seed=3, n_val=24, batch_size=10))
    b = RetrievalModule(tiny_spec)
    validate(b, RetrievalDataModule(source="shapes", n=24, seed=3, image_size=32, batch_size=24))
    assert isinstance(a.gallery, ShapesGallery) and a.gallery.fingerprint() == b.gallery.fingerprint()
    assert a.recall_values == b.recall_values
    torch.testing.assert_close(a.gallery_embeddings.text_emb, b.gallery_embeddings.text_emb, atol=1e-5, rtol=0)


def test_other_tasks_are_rejected(tiny_spec):
    module = RetrievalModule(tiny_spec)
    with pytest.raises(ValueError, match="retrieval"):
        module.validation_step({"task": "classification", "image": torch.zeros(1, 3, 32, 32)}, 0)


def count_work(monkeypatch):
    """Count image decodes of ShapesGallery and forward passes of every backbone."""
    calls = {"image": 0, "encode": 0}
    image, encode = ShapesGallery.image, RetrievalModule.embed_images

    def counted_image(self, i):
        calls["image"] += 1
        return image(self, i)

    def counted_encode(self, images):
        calls["encode"] += 1
        return encode(self, images)

    monkeypatch.setattr(ShapesGallery, "image", counted_image)
    monkeypatch.setattr(RetrievalModule, "embed_images", counted_encode)
    return calls


def run_cached(spec, cache_dir, n=16, **data_kw):
    module = RetrievalModule(spec, cache_dir=str(cache_dir))
    validate(module, RetrievalDataModule(source="shapes", n=n, seed=0, image_size=32, batch_size=8, **data_kw))
    return module


def test_cache_hit_skips_model_and_images_and_gives_the_same_numbers(tiny_spec, tmp_path, monkeypatch):
    calls = count_work(monkeypatch)
    first = run_cached(tiny_spec, tmp_path)
    assert first._cache.status == "miss; written" and calls == {"image": 16, "encode": 2}
    meta = json.loads((first._cache.dir / "meta.json").read_text())
    assert meta["image_keys"] == first.gallery.keys() and meta["captions"] == first.gallery.all_captions()[0]
    assert meta["key"]["backbone"] == tiny_spec and meta["key"]["gallery"]["n"] == 16

    second = run_cached(tiny_spec, tmp_path)
    assert second._cache.status == "hit" and calls == {"image": 16, "encode": 2}  # nothing decoded or run
    assert second.recall_values == first.recall_values
    assert torch.equal(second.gallery_embeddings.text_emb, first.gallery_embeddings.text_emb)
    assert second.extra_results()["retrieval"]["embedding_cache"]["status"] == "hit"


def test_cache_hit_inside_an_evaluation_suite_skips_the_images_too(tiny_spec, tmp_path, monkeypatch):
    calls = count_work(monkeypatch)

    def run():
        member = RetrievalModule(tiny_spec, cache_dir=str(tmp_path))
        data = CombinedDataModule(
            {"retrieval": RetrievalDataModule(source="shapes", n=16, seed=0, image_size=32, batch_size=8)}
        )
        validate(EvaluationSuite({"retrieval": member}, routes={"retrieval": "retrieval"}), data)
        return member

    first = run()
    assert first._cache.status == "miss; written" and calls == {"image": 16, "encode": 2}
    second = run()
    assert second._cache.status == "hit" and calls == {"image": 16, "encode": 2}
    assert second.recall_values == first.recall_values


def test_changed_key_recomputes(tiny_spec, tmp_path, monkeypatch):
    first = run_cached(tiny_spec, tmp_path)
    calls = count_work(monkeypatch)
    other_gallery = run_cached(tiny_spec, tmp_path, n=12)  # another subset
    assert other_gallery._cache.status == "miss; written" and calls["encode"] == 2
    assert other_gallery._cache.dir != first._cache.dir

    first_dir, first_images = first._cache.dir, first.gallery_embeddings.image_emb
    with torch.no_grad():  # the same module and spec, weights changed in place
        first.backbone.model.visual.proj.mul_(-1.0)
    validate(first, RetrievalDataModule(source="shapes", n=16, seed=0, image_size=32, batch_size=8))
    assert first._cache.status == "miss; written" and first._cache.dir != first_dir
    assert calls["encode"] == 4
    torch.testing.assert_close(first.gallery_embeddings.image_emb, -first_images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "reorder"])
def test_corrupt_cache_is_detected_logged_and_recomputed(tiny_spec, tmp_path, monkeypatch, caplog, damage):
    first = run_cached(tiny_spec, tmp_path)
    path = first._cache.dir / TENSORS_NAME
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":  # same length, one embedding value changed
        data[-7] ^= 0xFF
        path.write_bytes(bytes(data))
    else:  # the gallery's captions no longer match the frozen order
        meta_path = first._cache.dir / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["captions"][0], meta["captions"][1] = meta["captions"][1], meta["captions"][0]
        meta_path.write_text(json.dumps(meta))
    calls = count_work(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="xclip.data.embedding_cache"):
        again = run_cached(tiny_spec, tmp_path)
    reason = {"truncate": "corrupt or truncated", "flip": "corrupt or truncated", "reorder": "order"}[damage]
    assert again._cache.status.startswith("invalid") and reason in again._cache.status
    assert any(reason in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert calls["encode"] == 2  # recomputed, not read
    assert again.recall_values == first.recall_values
    assert torch.equal(again.gallery_embeddings.image_emb, first.gallery_embeddings.image_emb)
    third = run_cached(tiny_spec, tmp_path)  # the rewritten entry is intact again
    assert third._cache.status == "hit" and calls["encode"] == 2


def test_partial_gallery_is_not_cached(tiny_spec, tmp_path):
    module = RetrievalModule(tiny_spec, cache_dir=str(tmp_path))
    validate(
        module, RetrievalDataModule(source="shapes", n=16, seed=0, image_size=32, batch_size=4), limit_val_batches=2
    )
    assert module.gallery_embeddings.image_index.tolist() == list(range(8))
    assert module._cache.status == "miss" and not module._cache.meta_path.exists()


def test_callbacks_see_gallery_and_embeddings_at_validation_end(tiny_spec):
    seen = {}

    class Reader(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen["emb"], seen["gallery"] = pl_module.gallery_embeddings, pl_module.gallery

    module = RetrievalModule(tiny_spec)
    data = RetrievalDataModule(source="shapes", n=10, seed=0, image_size=32, batch_size=4)
    validate(module, data, callbacks=[Reader()])
    assert seen["gallery"] is data.gallery and seen["emb"] is module.gallery_embeddings
    assert seen["emb"].image_emb.shape == (10, 32) and seen["emb"].text_emb.shape == (20, 32)
    torch.testing.assert_close(seen["emb"].image_emb.norm(dim=-1), torch.ones(10))
