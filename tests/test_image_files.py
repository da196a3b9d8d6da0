"""Decoding image files safely (images.py): truncation, bombs, non-images, and the download check."""

import io

import numpy as np
import pytest
from PIL import Image

from animl_retrain.vision.images import BadImageError, verify_image


def jpeg(size=(400, 300)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def test_whole_jpeg_passes_and_gives_its_size(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg())
    assert verify_image(path) == (400, 300)


@pytest.mark.parametrize("cut", [600, -50, -2000])
def test_truncated_jpeg_is_refused(tmp_path, cut):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg()[:cut])
    with pytest.raises(BadImageError):
        verify_image(path)


def test_jpeg_with_a_trailer_after_its_end_marker_is_decoded_and_passes(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg() + b"maker trailer")
    assert verify_image(path) == (400, 300)


def test_other_formats_are_decoded(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (1, 2, 3)).save(buf, format="PNG")
    path = tmp_path / "a.png"
    path.write_bytes(buf.getvalue())
    assert verify_image(path) == (50, 40)
    path.write_bytes(buf.getvalue()[:-30])
    with pytest.raises(BadImageError):
        verify_image(path)


def test_garbage_and_oversized_images_are_refused(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"not a jpeg at all")
    with pytest.raises(BadImageError, match="cannot decode"):
        verify_image(path)
    path.write_bytes(jpeg())
    with pytest.raises(BadImageError, match="over the ceiling"):
        verify_image(path, max_pixels=1000)


def test_truncation_stays_an_error_when_a_library_flips_pillows_global(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg()[:-2000])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as megadetector's visualization_utils does
    with pytest.raises(BadImageError):
        verify_image(path)
