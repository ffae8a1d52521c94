"""load_image: one clear BadImageError per broken file, RGB for every convertible mode."""
import io
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import BadImageError, load_image
from pipeline.data.synthetic import CONVERTIBLE_IMAGE_KINDS, CORRUPT_IMAGE_KINDS, make_bad_images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_bad_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("kind", CORRUPT_IMAGE_KINDS)
def test_each_broken_file_raises_bad_image_error_naming_it(files, kind):
    with pytest.raises(BadImageError) as info:
        load_image(files[kind])
    assert str(files[kind]) in str(info.value) and info.value.path == files[kind]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", CONVERTIBLE_IMAGE_KINDS)
def test_each_convertible_mode_loads_as_rgb_of_the_same_size(files, kind):
    img = load_image(files[kind])
    assert img.mode == "RGB" and img.size == (48, 32)


def test_lossless_conversions_keep_the_stored_values(files):
    original = np.asarray(Image.open(files["rgba"]))  # (H, W, 4)
    assert np.array_equal(np.asarray(load_image(files["rgba"])), original[..., :3])  # alpha dropped
    la = np.asarray(Image.open(files["la"]))[..., 0]  # (H, W)
    assert np.array_equal(np.asarray(load_image(files["la"])), np.repeat(la[..., None], 3, axis=2))
    # 16-bit grey was written as L * 257, so scaling back must give L exactly, on all 3 channels.
    gray16 = np.asarray(load_image(files["gray16"]))
    grey8 = (np.asarray(Image.open(files["gray16"])) // 257).astype(np.uint8)  # (H, W)
    assert np.array_equal(gray16, np.repeat(grey8[..., None], 3, axis=2))
    pal = Image.open(files["palette_transparent"])
    expected = np.asarray(pal.convert("RGBA"))[..., :3]  # palette colours, not indices
    assert np.array_equal(np.asarray(load_image(files["palette_transparent"])), expected)
    bilevel = np.asarray(load_image(files["bilevel"]))
    assert set(np.unique(bilevel)) <= {0, 255}


def test_grayscale_and_cmyk_jpegs_convert_to_plausible_rgb(files):
    grey = np.asarray(load_image(files["grayscale"])).astype(int)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    reference = np.asarray(load_image(files["jpeg_named_png"])).astype(int)  # same pixels, RGB JPEG
    cmyk = np.asarray(load_image(files["cmyk"])).astype(int)
    # CMYK of an RGB image is (255 - RGB, K=0); a wrong channel order or inversion is ~128 off.
    assert np.abs(cmyk - reference).mean() < 5


def test_jpeg_with_png_extension_is_decoded_by_content(files):
    raw = files["jpeg_named_png"].read_bytes()
    assert raw[:2] == b"\xff\xd8"  # really a JPEG
    assert np.array_equal(np.asarray(load_image(files["jpeg_named_png"])),
                          np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))


def test_decompression_bomb_rejected_from_header_without_decoding(files, tmp_path):
    start = time.perf_counter()
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(files["bomb_png"])  # 10^10 declared pixels: decoding would need 30 GB
    assert time.perf_counter() - start < 1.0
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(small)
    with pytest.raises(BadImageError, match="64x64 exceeds 1000 pixels"):
        load_image(small, max_pixels=1000)
    assert load_image(small, max_pixels=64 * 64).size == (64, 64)


def test_image_is_fully_decoded_before_return(tmp_path):
    path = tmp_path / "a.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    expected = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
    img = load_image(path)
    path.unlink()  # lazily decoded pixels would now fail to read
    assert np.array_equal(np.asarray(img), expected)
