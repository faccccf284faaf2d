"""One image-reading function for every loader: each file mode decodes to the RGB values it means."""

import numpy as np
import pytest
import torch
from PIL import Image

from xclip.data.image_folder import ImageFolder, collate_skipping
from xclip.data.images import BACKGROUND, ImageReadError, load_image01, read_rgb


def rgb(path) -> np.ndarray:
    img = read_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_16bit_greyscale_png_is_scaled_not_clipped_to_white(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 50000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    out = rgb(tmp_path / "grey16.png")
    expected = np.round(values / 65535 * 255).astype(np.uint8)
    assert np.array_equal(out, np.repeat(expected[..., None], 3, -1))
    # what a plain convert("RGB") gives: the bug this replaces
    assert (np.asarray(Image.open(tmp_path / "grey16.png").convert("RGB")) == 255).sum() > 3


def test_32bit_integer_and_float_images(tmp_path):
    ints = np.array([[0, 65535], [32768, 6553]], dtype=np.int32)
    Image.fromarray(ints, mode="I").save(tmp_path / "int32.tif")
    assert np.array_equal(rgb(tmp_path / "int32.tif")[..., 0], np.round(ints / 65535 * 255).astype(np.uint8))
    floats = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    assert np.array_equal(rgb(tmp_path / "float.tif")[..., 1], np.round(floats * 255).astype(np.uint8))
    Image.fromarray(floats * 255, mode="F").save(tmp_path / "float255.tif")
    with pytest.raises(ImageReadError, match=r"float255.tif: float image values span \[0, 255\]"):
        read_rgb(tmp_path / "float255.tif")


def test_transparency_is_composited_on_the_documented_background(tmp_path):
    assert BACKGROUND == (255, 255, 255)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue: background shows
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black over white
    rgba[1, 1] = (0, 255, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = rgb(tmp_path / "rgba.png").astype(int)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [0, 255, 0] and abs(out[1, 0] - 127).max() <= 1
    la = Image.fromarray(np.array([[[10, 255], [200, 0]]], np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert rgb(tmp_path / "la.png")[0].tolist() == [[10, 10, 10], [255, 255, 255]]


def test_palette_image_with_a_transparent_index(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # index 0 (black) is transparent
    pal.save(tmp_path / "pal.png", transparency=0)
    assert rgb(tmp_path / "pal.png")[0].tolist() == [[255, 255, 255], [255, 0, 0]]


def test_cmyk(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")  # pure red in CMYK
    assert rgb(tmp_path / "cmyk.tif")[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red top-left of the stored (unrotated) image
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rotated.png", exif=exif)
    out = rgb(tmp_path / "rotated.png")
    assert out.shape == (3, 2, 3)  # displayed upright: height and width swapped
    assert out[0, -1].tolist() == [255, 0, 0] and out.sum() == 255  # the red pixel went to the top-right


def test_unreadable_files_are_named_and_skipped_with_their_paths(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=r"broken.png: cannot read the image"):
        read_rgb(tmp_path / "broken.png")
    assert load_image01(tmp_path / "broken.png", 8) is None
    assert torch.equal(load_image01(tmp_path / "ok.png", 8)[2], torch.ones(8, 8))
    folder = ImageFolder(tmp_path, image_size=8)
    batch = collate_skipping([folder[i] for i in range(len(folder))])
    assert batch["skipped"] == 1 and batch["skipped_paths"] == ["broken.png"]
    assert batch["image"].shape == (1, 3, 8, 8)


def test_a_png_declaring_too_many_pixels_is_skipped_as_unreadable(tmp_path):
    from file_fixtures import write_bomb_png

    from xclip.data.images import MAX_PIXELS

    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 300 and 30000 * 30000 > MAX_PIXELS
    with pytest.raises(ImageReadError, match=r"bomb.png: declares .* pixels, over xclip's limit"):
        read_rgb(bomb)
    mid = write_bomb_png(
        tmp_path.parent / f"{tmp_path.name}-mid" / "mid.png", 9000, 9000
    )  # under Pillow's own refusal, over ours
    with pytest.raises(ImageReadError, match=r"mid.png: declares 9000 x 9000 pixels, over xclip's limit"):
        read_rgb(mid)
    assert load_image01(bomb, 8) is None
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "ok.png")
    folder = ImageFolder(tmp_path, image_size=8)
    batch = collate_skipping([folder[i] for i in range(len(folder))])
    assert batch["skipped"] == 1 and batch["skipped_paths"] == ["bomb.png"]
