"""The crop fast path (partial JPEG decoding) gives the very pixels of a whole Pillow decode, or falls back."""

import numpy as np
import pytest
from PIL import Image

from animl_retrain.vision import images
from animl_retrain.vision.images import BadImageError, open_image
from animl_retrain.vision.preprocessing import crop_squares, cut_square, draft_scale

BOXES = [
    [[0.1, 0.2, 0.3, 0.4]],
    [[0.0, 0.0, 0.05, 0.05], [0.7, 0.6, 0.3, 0.4]],  # a small one in a corner, a large one at the other
    [[0.45, 0.9, 0.1, 0.1]],  # the square reaches past the bottom: zero padding
    [[0.3, 0.3, 0.2, 0.2], [0.33, 0.31, 0.21, 0.19], [0.6, 0.1, 0.1, 0.15]],
]


def frame(size=(1000, 700), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w * h).reshape(h, w)
    pixels = np.stack([ramp, ramp[::-1], np.full((h, w), 90)], axis=2) + rng.normal(0, 25, (h, w, 3))
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def write(tmp_path, name, img, **save):
    path = tmp_path / name
    img.save(path, **save)
    return path


def reference(path, boxes, size):
    """What the stage did before the fast path: a whole Pillow decode at the draft scale, then cut_square."""
    img, _ = open_image(path, scale_for=lambda w, h: draft_scale(boxes, w, h, size))
    return [np.asarray(cut_square(img, b, size)) for b in boxes]


FILES = {
    "4:2:0": ({"format": "JPEG", "quality": 85}, "RGB"),
    "4:4:4": ({"format": "JPEG", "quality": 90, "subsampling": 0}, "RGB"),
    "4:2:2": ({"format": "JPEG", "quality": 90, "subsampling": 1}, "RGB"),
    "greyscale": ({"format": "JPEG", "quality": 85}, "L"),
    "progressive": ({"format": "JPEG", "quality": 85, "progressive": True}, "RGB"),
    "cmyk": ({"format": "JPEG", "quality": 85}, "CMYK"),
    "png": ({"format": "PNG"}, "RGB"),
}


@pytest.mark.parametrize("kind", FILES)
@pytest.mark.parametrize("size", [64, 224])
def test_crops_are_the_pixels_of_a_whole_decode(tmp_path, kind, size):
    save, mode = FILES[kind]
    path = write(tmp_path, "x.img", frame((1237, 811), mode), **save)
    for boxes in BOXES:
        got = [np.asarray(c) for c in crop_squares(path, boxes, size, images.DEFAULT_MAX_PIXELS)]
        assert all(c.shape == (size, size, 3) for c in got)
        for a, b in zip(got, reference(path, boxes, size), strict=True):
            np.testing.assert_array_equal(a, b)


def test_multi_picture_files_and_bytes_after_the_end_marker(tmp_path):
    """Camera traps write MPO files (a preview after the picture) and some append bytes after the JPEG."""
    big, preview = frame((1600, 1200)), frame((320, 240), seed=1)
    mpo = write(tmp_path, "a.jpg", big, format="MPO", save_all=True, append_images=[preview], quality=85)
    assert Image.open(mpo).format == "MPO"
    trailing = tmp_path / "b.jpg"
    trailing.write_bytes(write(tmp_path, "c.jpg", big, format="JPEG").read_bytes() + b"maker notes \xcc\xbb")
    for path in (mpo, trailing):
        for boxes in BOXES:
            got = crop_squares(path, boxes, 128, images.DEFAULT_MAX_PIXELS)
            for a, b in zip(got, reference(path, boxes, 128), strict=True):
                np.testing.assert_array_equal(np.asarray(a), b)
    # the MPO's first picture is decoded at reduced scale, as a JPEG's is
    img, full = open_image(mpo, scale_for=lambda w, h: 4)
    assert (full, img.size) == ((1600, 1200), (400, 300))


@pytest.mark.skipif(images._jpegcrop is None, reason="the optional C extension is not built")
def test_the_extension_decodes_only_the_region_and_refuses_what_it_does_not_handle(tmp_path):
    data = write(tmp_path, "x.jpg", frame((800, 600)), format="JPEG").read_bytes()
    pixels, left, top, width, height = images._jpegcrop.decode(data, 2, 100, 50, 150, 90, False)
    assert (left, top) <= (98, 48) and left + width >= 152 and (top + height, width * height * 3) == (92, len(pixels))
    progressive = write(tmp_path, "p.jpg", frame((800, 600)), format="JPEG", progressive=True).read_bytes()
    assert images._jpegcrop.decode(progressive, 1, 0, 0, 10, 10, False) is None
    assert images._jpegcrop.decode(data[:-3000], 1, 0, 0, 10, 10, True) is None  # truncated: a warning
    assert images._jpegcrop.decode(b"not a jpeg", 1, 0, 0, 10, 10, False) is None
    with pytest.raises(ValueError, match="beyond"):
        images._jpegcrop.decode(data, 8, 0, 0, 200, 10, False)


def test_a_truncated_file_is_refused_as_before(tmp_path):
    path = tmp_path / "t.jpg"
    path.write_bytes(write(tmp_path, "x.jpg", frame((800, 600)), format="JPEG").read_bytes()[:-3000])
    with pytest.raises(BadImageError, match="cannot decode"):
        crop_squares(path, [[0.0, 0.0, 0.1, 0.1]], 64, images.DEFAULT_MAX_PIXELS)


def _widths(size: int, rng) -> list[int]:
    """Every side from 2 px to 4x ``size`` for small sizes; for 224 the stage's range (224-448 px), a sample above."""
    if size < 100:
        return list(range(2, 4 * size + 1))
    return [*range(2, 12), *range(size - 4, 2 * size + 5), *rng.integers(2 * size, 4 * size, 30).tolist()]


@pytest.mark.skipif(images._jpegcrop is None, reason="the optional C extension is not built")
@pytest.mark.parametrize("size", [32, 64, 224])
def test_the_extension_resizes_every_square_shape_exactly_as_pillow(size):
    """Boxes the crop rule cuts (sides equal or one apart), partly outside the region: Pillow's very pixels."""
    rng = np.random.default_rng(size)
    region = frame((4 * size + 60, 4 * size + 50), seed=size)
    rows = images.RGBRows(region.tobytes(), *region.size)
    for w in _widths(size, rng):
        for h in (w - 1, w, w + 1):
            if h < 1:
                continue
            left, top = (int(v) for v in rng.integers(-20, 40, 2))
            box = (left, top, left + w, top + h)
            want = np.asarray(region.crop(box).resize((size, size), Image.BILINEAR))
            np.testing.assert_array_equal(np.asarray(images.cut_resized(rows, box, size)), want, err_msg=str(box))


@pytest.mark.skipif(images._jpegcrop is None, reason="the optional C extension is not built")
def test_other_box_shapes_are_left_to_pillow():
    rows = images.RGBRows(bytes(300 * 200 * 3), 300, 200)
    assert images.cut_resized(rows, (0, 0, 100, 150), 64) is None  # Pillow may take its vertical pass first
    assert images.cut_resized(rows, (10, 10, 10, 20), 64) is None  # empty
    with pytest.raises(ValueError, match="width\\*height\\*3"):
        images._jpegcrop.resize(bytes(10), 300, 200, 0, 0, 10, 10, 64)
