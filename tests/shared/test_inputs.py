"""Images and texts are checked where they enter (Backbone.normalize / preprocess / tokenize and every
explainer): what would silently give wrong numbers fails before any model call, saying what to pass."""

import numpy as np
import pytest
import torch
from PIL import Image

from xclip.backbones import load_backbone
from xclip.data.shapes import generate
from xclip.explain import GAME, GradCAM, GradECLIP


@pytest.fixture(scope="module")
def bb():
    return load_backbone("xclip:tiny-shapes")


@pytest.fixture(scope="module")
def images01():
    return torch.stack([generate(seed=0, index=i).tensor() for i in range(2)])  # [2, 3, 64, 64] in [0, 1]


@pytest.fixture
def no_model_calls(bb, monkeypatch):
    """Fail the test if the vision or text tower runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran before the input was checked")

    for tower, name in (
        (bb.vision, "trace"),
        (bb.vision, "encode"),
        (bb.text, "encode"),
        (bb.text, "token_embedding"),
        (bb.text, "encode_embeddings"),
    ):
        monkeypatch.setattr(tower, name, refuse)
    return bb


# ---- Backbone.normalize ----------------------------------------------------------------------
def test_normalize_rejects_uint8_with_the_fix(bb, images01):
    with pytest.raises(TypeError, match=r"dtype torch.uint8.*\.float\(\) / 255"):
        bb.normalize((images01 * 255).to(torch.uint8))


def test_normalize_rejects_0_255_floats(bb, images01):
    with pytest.raises(
        ValueError, match=r"images01 values span \[30, 245\]; pass float images in \[0, 1\].*divide by 255"
    ):
        bb.normalize((images01 * 255).round())


def test_normalize_rejects_channels_last_and_unbatched(bb, images01):
    with pytest.raises(ValueError, match=r"channels last.*permute\(0, 3, 1, 2\)"):
        bb.normalize(images01.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"one image \[3, H, W\].*\[None\]"):
        bb.normalize(images01[0])


def test_normalize_rejects_nan_and_inf_naming_the_images(bb, images01):
    bad = images01.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(images \[1\]\)"):
        bb.normalize(bad)
    bad[1, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        bb.normalize(bad)


def test_normalize_accepts_valid_images_unchanged(bb, images01):
    mean = torch.tensor(bb.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(bb.normalize(images01), (images01 - mean) / std)


# ---- Backbone.preprocess ------------------------------------------------------------------------
def test_preprocess_takes_one_image_a_list_or_paths(bb, tmp_path):
    arrays = [generate(seed=1, index=i).image for i in range(3)]
    pil = [Image.fromarray(a) for a in arrays]
    one = bb.preprocess(pil[0])
    many = bb.preprocess(pil)
    assert one.shape == (3, 64, 64) and many.shape == (3, 3, 64, 64)
    torch.testing.assert_close(many[0], one)
    pil[2].save(tmp_path / "x.png")
    torch.testing.assert_close(bb.preprocess(tmp_path / "x.png"), many[2])
    torch.testing.assert_close(bb.preprocess([str(tmp_path / "x.png")])[0], many[2])
    # the default equals normalising the [0, 1] image (64 px: no resize, no crop)
    torch.testing.assert_close(
        many,
        bb.normalize(torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])),
        atol=1e-5,
        rtol=0,
    )


def test_preprocess_native_size_keeps_the_image_grid(bb):
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 83, 3), dtype=np.uint8))
    x = bb.preprocess(wide, size="native")
    assert x.shape == (3, 48, 80)  # each side rounded to a multiple of the patch size (8)
    assert bb.patch_grid(x[None]) == (6, 10)
    assert GradECLIP(bb).image_maps(x[None], ["a red circle"]).shape == (1, 1, 6, 10)
    with pytest.raises(ValueError, match="one size"):
        bb.preprocess([wide, wide.resize((40, 40))], size="native")
    with pytest.raises(TypeError, match="PIL images or image paths"):
        bb.preprocess([torch.rand(3, 8, 8)])


def test_preprocess_decodes_modes_like_the_loaders(bb):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red: composited on white
    torch.testing.assert_close(bb.preprocess(rgba), bb.normalize(torch.ones(1, 3, 64, 64))[0])


# ---- texts -----------------------------------------------------------------------------------
def test_blank_texts_are_rejected_naming_them(bb):
    with pytest.raises(ValueError, match=r"texts \[1, 2\] are empty or whitespace only"):
        bb.tokenize(["a red circle", "", "   "])
    with pytest.raises(TypeError, match="single string"):
        bb.tokenize("a red circle")
    with pytest.raises(TypeError, match=r"texts\[0\] is a int"):
        bb.tokenize([3])


# ---- explainers: checked before any model call -------------------------------------------------
@pytest.mark.parametrize("explainer", [GradECLIP, GradCAM, GAME])
def test_explainers_reject_bad_images_before_any_model_call(no_model_calls, images01, explainer):
    ex = explainer(no_model_calls)
    x = no_model_calls.normalize(images01)
    texts = ["a red circle", "a blue star"]
    with pytest.raises(TypeError, match="uint8"):
        ex.image_maps((images01 * 255).to(torch.uint8), texts)
    with pytest.raises(ValueError, match=r"outside what normalised \[0, 1\] images give.*backbone.normalize"):
        ex.image_maps(images01 * 255, texts)  # 0-255 floats, not normalised
    with pytest.raises(ValueError, match="channels last"):
        ex.pair_maps(x.permute(0, 2, 3, 1), texts)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ex.pair_maps(nan, texts)
    with pytest.raises(ValueError, match=r"texts \[1\] are empty or whitespace only"):
        ex.image_maps(x, ["a red circle", " "])


def test_text_maps_reject_blank_texts_before_any_model_call(no_model_calls, images01):
    x = no_model_calls.normalize(images01)
    with pytest.raises(ValueError, match=r"texts \[0\] are empty"):
        GradECLIP(no_model_calls).text_maps(x, ["", "a blue star"])
    with pytest.raises(ValueError, match="NaN"):
        GradECLIP(no_model_calls).text_maps(x * float("nan"), ["a blue star"])
