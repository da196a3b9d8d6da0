"""Decoding image files safely (images.py): truncation, bombs, non-images, and the download check."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from animl_retrain.vision.images import BadImageError, jpeg_end, verify_image


def jpeg(size=(400, 300), progressive=False) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", progressive=progressive)
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


def test_jpeg_with_a_trailer_after_its_end_marker_passes_without_a_decode(tmp_path):
    data = jpeg()
    path = tmp_path / "a.jpg"
    path.write_bytes(data + b"maker trailer \xff\xd8\xff" + bytes(300))  # maker data, as Reconyx frames carry
    assert jpeg_end(path.read_bytes()) == len(data)
    assert verify_image(path) == (400, 300)


def with_exif_thumbnail(data: bytes) -> bytes:
    """``data`` with an APP1 segment holding a whole small JPEG (as an EXIF thumbnail does: its own end marker)."""
    thumb = jpeg((40, 30))
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(thumb) + 8) + b"Exif\0\0" + thumb + data[2:]


def mpo(first: bytes, second: bytes) -> bytes:
    """Two pictures in one file as a camera's MPO: Pillow's own MPO writer (an MP index in APP2 of the first)."""
    buf = io.BytesIO()
    images = [Image.open(io.BytesIO(first)), Image.open(io.BytesIO(second))]
    images[0].save(buf, format="MPO", save_all=True, append_images=images[1:])
    return buf.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
def test_real_shaped_jpegs_are_proven_whole_by_their_markers(tmp_path, progressive):
    data = jpeg(progressive=progressive)
    shapes = {
        "plain": data,
        "exif thumbnail": with_exif_thumbnail(data),
        "thumbnail and trailer": with_exif_thumbnail(data) + b"\x09\x32\x35\x35" * 500,
        "fill bytes before the end marker": data[:-2] + b"\xff\xff\xff\xd9",
    }
    for name, whole in shapes.items():
        end = jpeg_end(whole)
        assert end is not None and whole[end - 2 : end] == b"\xff\xd9", name
        path = tmp_path / "a.jpg"
        path.write_bytes(whole)
        assert verify_image(path) == (400, 300), name


def test_mpo_is_proven_whole_by_its_first_picture_and_its_truncation_refused(tmp_path):
    data = mpo(jpeg(), jpeg((200, 150)))
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "MPO"
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert jpeg_end(data) < len(data)  # the second picture is left unread
    assert verify_image(path) == (400, 300)
    first_end = jpeg_end(data)
    path.write_bytes(data[: first_end - 3000])  # cut inside the first picture
    with pytest.raises(BadImageError, match="cannot decode"):
        verify_image(path)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(bytes(4000), id="zeros"),  # a cut-short copy padded to its size: a decoder fills it silently
        pytest.param(np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes(), id="random"),
        pytest.param(b"maker trailer" * 20, id="text"),
    ],
)
def test_truncated_jpeg_with_trailing_garbage_is_refused(tmp_path, progressive, tail):
    path = tmp_path / "a.jpg"
    path.write_bytes(with_exif_thumbnail(jpeg(progressive=progressive))[:-2000] + tail)
    with pytest.raises(BadImageError, match="cannot decode"):
        verify_image(path)


def test_jpeg_missing_only_its_end_marker_is_refused(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg()[:-2])
    with pytest.raises(BadImageError, match="truncated"):
        verify_image(path)


def test_the_marker_walk_leaves_odd_layouts_to_the_decoder(tmp_path):
    data = jpeg()
    sos = data.index(b"\xff\xda")
    odd = data[:sos] + b"\x00\x00" + data[sos:]  # stray bytes between segments: libjpeg skips them
    assert jpeg_end(odd) is None
    path = tmp_path / "a.jpg"
    path.write_bytes(odd)
    assert verify_image(path) == (400, 300)  # decoded instead, and whole
    assert jpeg_end(b"\xff\xd8\xff\xd9") is None  # an end marker with no scan before it proves nothing


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
