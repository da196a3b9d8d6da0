import errno
import io

import numpy as np
import pytest
from PIL import Image

from animl_retrain.core.io import read_json
from animl_retrain.formats import layout, tables
from animl_retrain.stages import crop
from animl_retrain.vision.preprocessing import Preprocessing, cut_square, draft_scale, square_region


def test_square_region_centres_and_clamps():
    # a 20x10 box in the middle of a 100x100 image: a 20x20 square centred on it
    assert square_region([0.4, 0.45, 0.2, 0.1], 100, 100) == pytest.approx((40, 40, 20))
    # the same box at the left edge: the square slides right to stay inside
    assert square_region([0.0, 0.0, 0.1, 0.3], 100, 100) == pytest.approx((0, 0, 30))
    # at the bottom-right corner: it slides up and left
    assert square_region([0.9, 0.95, 0.1, 0.05], 100, 100) == pytest.approx((90, 90, 10))
    # a box taller than the image is wide: centred on the image horizontally, zero-padded on both sides
    assert square_region([0.0, 0.0, 0.5, 1.0], 60, 100) == pytest.approx((-20, 0, 100))


def test_cut_square_pads_with_zeros():
    img = Image.new("RGB", (60, 100), (255, 255, 255))
    out = cut_square(img, [0.0, 0.0, 0.5, 1.0], 50)
    assert out.size == (50, 50)
    assert out.getpixel((0, 25)) == (0, 0, 0) and out.getpixel((25, 25)) == (255, 255, 255)


def test_draft_scale_keeps_crops_at_full_resolution():
    assert draft_scale([[0, 0, 0.5, 0.5]], 2048, 1536, 224) == 4  # 1024 px side -> /4 leaves 256
    assert draft_scale([[0, 0, 0.05, 0.05]], 2048, 1536, 224) == 1  # 102 px side: no reduction
    assert draft_scale([[0, 0, 1, 1], [0, 0, 0.1, 0.1]], 2048, 1536, 64) == 2


def test_serving_crop_matches_stored_crop(stage_outputs):
    """The crop stage and a model's own preprocessing cut the same square from the same image."""
    crops = tables.read_table(stage_outputs["crops"] / "crops.csv", tables.CROPS)
    row = crops.iloc[0]
    stored = Image.open(stage_outputs["crops"] / layout.CROPS_DIR / row["crop"]).convert("RGB")
    image = stage_outputs["images"] / "images" / row["file"]
    served = Preprocessing(image_size=32).crop_from_image(image.read_bytes(), [row.x, row.y, row.w, row.h])
    buf = io.BytesIO()
    served.save(buf, format="JPEG", quality=95)
    reencoded = Image.open(buf).convert("RGB")

    def mean_abs(a, b):
        return np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean()

    # Stored crops are JPEGs, and an image with several boxes is decoded at the scale its smallest box allows:
    # at 32 px both add a few grey levels (measured: ~4 and ~2.4 of 255); anything beyond is a different cut.
    assert mean_abs(stored, served) < mean_abs(served, reencoded) + 3


def test_crop_manifest(stage_outputs):
    crops = tables.read_table(stage_outputs["crops"] / "crops.csv", tables.CROPS)
    report = read_json(stage_outputs["crops"] / "report.json")
    assert report["counts"]["crops"] == len(crops) > 50
    assert set(crops["box_source"]) == {"ground_truth"}
    # every crop carries its image's location, camera and datetime (the split groups by them)
    images = tables.read_table(stage_outputs["images"] / "images.csv", tables.IMAGES).set_index("image_id")
    for col in ("location", "camera", "datetime"):
        expected = crops["image_id"].map(images[col])
        assert crops[col].eq(expected).all() and crops[col].ne("").all(), col
    assert crops["annotation_id"].is_unique
    for rel in crops["crop"].head(10):
        assert Image.open(stage_outputs["crops"] / layout.CROPS_DIR / rel).size == (32, 32)


def test_unreadable_images_are_reported_not_fatal(stage_outputs, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(stage_outputs["images"], images)
    victims = tables.read_table(images / "images.csv", tables.IMAGES)["file"].head(2)
    (images / "images" / victims.iloc[0]).write_bytes(b"garbage")
    (images / "images" / victims.iloc[1]).write_bytes((images / "images" / victims.iloc[1]).read_bytes()[:500])
    result = crop.run(
        crop.CropConfig(
            images=images, ground_truth=stage_outputs["ground_truth"], out=tmp_path / "c", crop_size=32, workers=2
        )
    )
    assert result.failed_images == 2
    report = read_json(tmp_path / "c" / "report.json")
    assert {p["where"] for p in report["problems"]} == set(victims)


def test_atomic_write_leaves_the_file_whole_or_absent(tmp_path, monkeypatch):
    from animl_retrain.core import io as core_io
    from animl_retrain.core.errors import DiskFullError

    path = tmp_path / "new" / "deeper" / "a.jpg"  # its folders are made on the way
    core_io.atomic_write(path, b"first")
    core_io.atomic_write(path, b"second")
    assert path.read_bytes() == b"second" and sorted(p.name for p in path.parent.iterdir()) == ["a.jpg"]

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core_io.os, "replace", full)
    with pytest.raises(DiskFullError, match="no space left on device"):
        core_io.atomic_write(path, b"third")
    assert path.read_bytes() == b"second" and sorted(p.name for p in path.parent.iterdir()) == ["a.jpg"]
