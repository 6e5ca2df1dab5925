"""Image loading for every mode users send."""

import numpy as np
import pytest
from PIL import Image

from internvl_jax.processing.images import load_image, to_rgb

RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA"])
def test_modes_become_rgb_like_pil_convert(tmp_path, mode):
    src = Image.fromarray(RGB).convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    src.save(path)
    got = load_image(path)
    assert got.mode == "RGB" and got.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Image.open(path).convert("RGB")))


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    got = np.asarray(load_image(tmp_path / "x.png"))
    np.testing.assert_array_equal(got[..., 0], np.round(a * 255.0 / 65535.0).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.fromarray(RGB).save(tmp_path / "x.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "x.jpg").size == (20, 30)


def test_a_callers_image_is_never_returned_or_changed(tmp_path):
    """to_rgb gives a new image (rotated or not), leaving the caller's alone; load_image decodes in place: its
    JPEG comes back as decoded, pixel for pixel the original's ``Image.open(f).convert('RGB')``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    for kw in ({}, {"exif": exif}):
        src = Image.fromarray(RGB)
        src.save(tmp_path / "x.jpg", quality=95, **kw)
        mine = Image.open(tmp_path / "x.jpg")
        mine.load()
        kept = np.asarray(mine).copy()
        got = to_rgb(mine)
        assert got is not mine and mine.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(mine), kept)
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "x.jpg")), np.asarray(got))
    np.testing.assert_array_equal(np.asarray(got.rotate(90, expand=True)), kept)  # orientation 6, undone
    src.save(tmp_path / "plain.jpg", quality=95)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "plain.jpg")),
                                  np.asarray(Image.open(tmp_path / "plain.jpg").convert("RGB")))


def test_unreadable_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="cannot read image .*bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match="not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
