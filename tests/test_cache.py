"""The content-addressed cache against the real SeaweedFS server: reruns fetch and crop only what is new."""

import json

import numpy as np
import pytest
from PIL import Image

from animl_retrain.core import cache
from animl_retrain.stages import cct_to_md, crop, download, export
from tests.conftest import TEST_SPEC, make_export

pytestmark = pytest.mark.server


def noisy_jpeg(seed: int) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def project(n: int) -> dict:
    images, annotations = [], []
    for i in range(n):
        images.append(
            {
                "id": f"p:{i:04d}",
                "file_name": f"p/cam/site/p-{i:04d}.jpg",
                "serving_bucket_key": f"original/p:{i:04d}-original.jpg",
                "location": f"L{i % 3}",
                "width": 128,
                "height": 96,
            }
        )
        annotations += [
            {"id": f"a{i}", "image_id": f"p:{i:04d}", "category_id": 1, "bbox": [10, 10, 40, 30], "validated": True},
            {"id": f"b{i}", "image_id": f"p:{i:04d}", "category_id": 2, "bbox": [60, 40, 30, 30], "validated": True},
        ]
    return make_export(images=images, annotations=annotations)


def retrain(tmp_path, data, bucket, name, cache_uri=""):
    """Export -> download -> cct-to-md -> crop into ``tmp_path/name``; the download and crop results."""
    root = tmp_path / name
    (root / "export.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "export.json").write_text(json.dumps(data))
    export.run(export.ExportConfig(source=str(root / "export.json"), label_spec=TEST_SPEC, out=root / "export"))
    got = download.run(
        download.DownloadConfig(
            export=root / "export", images_uri=f"s3://{bucket}", out=root / "images", cache_uri=cache_uri
        )
    )
    cct_to_md.run(cct_to_md.CctToMdConfig(export=root / "export", images=root / "images", out=root / "gt"))
    crops = crop.run(
        crop.CropConfig(images=root / "images", ground_truth=root / "gt", out=root / "crops", cache_uri=cache_uri)
    )
    return got, crops, {p.relative_to(root / "crops"): p.read_bytes() for p in (root / "crops").rglob("*.jpg")}


def put(s3, bucket, data):
    for i, img in enumerate(data["images"]):
        s3.put_object(Bucket=bucket, Key=img["serving_bucket_key"], Body=noisy_jpeg(i))


def test_a_rerun_fetches_and_crops_only_new_images_with_identical_crops(s3, bucket, tmp_path):
    first, later = project(20), project(22)  # two new images (four new crops) by the second run
    put(s3, bucket, later)
    cache_uri = f"s3://{bucket}/retrain-cache"
    got, crops, cold = retrain(tmp_path, first, bucket, "cold", cache_uri)
    assert (got.downloaded, got.in_cache, crops.crops, crops.from_cache) == (20, 0, 40, 0)

    got, crops, warm = retrain(tmp_path, later, bucket, "warm", cache_uri)
    assert (got.downloaded, got.in_cache, crops.crops, crops.from_cache) == (2, 20, 44, 40)
    assert not (tmp_path / "warm" / "images" / "images" / "p/cam/site/p-0000.jpg").exists()  # left in the cache
    _, _, plain = retrain(tmp_path, later, bucket, "no-cache")
    assert warm == plain and {k: v for k, v in warm.items() if k in cold} == cold  # byte-identical crops
    assert not (tmp_path / "warm" / "crops" / crop.CACHED_IMAGES_DIR).exists()


def test_entries_that_do_not_match_their_checksum_are_refused_and_redone(s3, bucket, tmp_path):
    data = project(4)
    put(s3, bucket, data)
    cache_uri = f"s3://{bucket}/c"
    *_, cold = retrain(tmp_path, data, bucket, "cold", cache_uri)
    packs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="c/packs/")["Contents"]]
    pack = next(k for k in packs if k.endswith(".bin"))
    body = bytearray(s3.get_object(Bucket=bucket, Key=pack)["Body"].read())
    body[100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=pack, Body=bytes(body))
    images = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="c/images/")["Contents"]]
    s3.put_object(Bucket=bucket, Key=images[0], Body=noisy_jpeg(99))  # a cached image swapped for another

    _, crops, warm = retrain(tmp_path, data, bucket, "warm", cache_uri)
    report = json.loads((tmp_path / "warm" / "crops" / "report.json").read_text())
    assert report["cache"]["entries_refused"] == 1 and crops.from_cache == 6  # the image's other crop is redone
    assert warm == cold and crops.failed_images == 0
    store = cache.ContentCache(cache_uri, max_gb=1)
    assert store.get_image(images[0].split("/")[-1]) is None and store.refused == 1


def test_a_killed_stage_leaves_nothing_a_reader_takes(s3, bucket, tmp_path):
    """A pack is visible only through its index, written last; an index without its pack is a miss."""
    store = cache.ContentCache(f"s3://{bucket}/k", max_gb=1)
    store.put_packed({"a": b"alpha", "b": b"beta"})
    s3.put_object(Bucket=bucket, Key="k/packs/killed.bin", Body=b"half a pack")  # killed before its index
    s3.put_object(Bucket=bucket, Key="k/packs/orphan.json", Body=json.dumps({"c": [0, 3, "0" * 64]}).encode())
    index = store.pack_index()
    assert sorted(index) == ["a", "b", "c"]
    assert store.get_packed(["a", "b", "c", "d"], index) == {"a": b"alpha", "b": b"beta"}
    assert store.refused == 1


def test_the_size_limit_removes_the_oldest_entries(tmp_path):
    store = cache.ContentCache(str(tmp_path / "c"), max_gb=150e-9)  # 150 bytes: room for one pack and its index
    store.put_packed({"old": b"x" * 20})
    store.put_packed({"new": b"y" * 20})
    old = next(p for p in (tmp_path / "c" / "packs").glob("*.json") if "old" in p.read_text())
    import os

    os.utime(old, (1, 1))
    os.utime(old.with_suffix(".bin"), (1, 1))
    assert store.trim() >= 1
    assert list(store.pack_index()) == ["new"]
    data = b"an image"
    (tmp_path / "img").write_bytes(data)
    checksum = cache.file_checksum(tmp_path / "img")
    store.put_image(checksum, data)
    os.utime(tmp_path / "c" / "images" / checksum, (1, 1))  # the oldest entry, but this run uses it
    store.trim(keep={checksum})
    assert store.get_image(checksum) == data
    assert not store.put_image("md5-" + "0" * 32, b"not these bytes")
    assert store.get_image("md5-" + "0" * 32) is None


def test_a_rerun_with_every_crop_cached_starts_no_process(s3, bucket, tmp_path, monkeypatch):
    data = project(6)
    put(s3, bucket, data)
    cache_uri = f"s3://{bucket}/all-cached"
    *_, cold = retrain(tmp_path, data, bucket, "cold", cache_uri)
    monkeypatch.setattr(crop, "ProcessPoolExecutor", None)  # calling it would raise: nothing left to cut
    got, crops, warm = retrain(tmp_path, data, bucket, "warm", cache_uri)
    assert (got.downloaded, got.in_cache, crops.crops, crops.from_cache) == (0, 6, 12, 12)
    assert warm == cold
    assert not [p for p in (tmp_path / "warm" / "crops").rglob("*.part")]


def test_atomic_write_writes_whole_files_or_nothing(tmp_path):
    from animl_retrain.core.io import atomic_write, remove_partial_files

    path = tmp_path / "new" / "folder" / "a.jpg"
    atomic_write(path, b"first")  # the folder is made on the way
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # fails mid-write: the file keeps its bytes, no temporary file stays
    assert path.read_bytes() == b"second" and sorted(p.name for p in path.parent.iterdir()) == ["a.jpg"]
    (path.parent / ".a.jpg.0123abcd.part").write_bytes(b"a killed write")  # the name atomic_write writes under
    assert remove_partial_files(tmp_path) == 1
