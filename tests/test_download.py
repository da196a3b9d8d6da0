import hashlib
import json

import pytest

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.formats import tables
from animl_retrain.stages import download, export
from tests.conftest import TEST_SPEC, jpeg_bytes, make_export

pytestmark = pytest.mark.server


def many_images(n: int) -> dict:
    """An export with n images of foxes, each with one box."""
    images, annotations = [], []
    for i in range(n):
        images.append(
            {
                "id": f"p:{i:04d}",
                "file_name": f"p/cam/site/p-{i:04d}.jpg",
                "serving_bucket_key": f"original/p:{i:04d}-original.jpg",
                "location": f"L{i % 3}",
            }
        )
        annotations.append({"id": f"a{i}", "image_id": f"p:{i:04d}", "category_id": 1, "bbox": [1, 1, 10, 10]})
    return make_export(images=images, annotations=annotations)


@pytest.fixture
def exported(tmp_path):
    def make(data):
        src = tmp_path / "export.json"
        src.write_text(json.dumps(data))
        out = tmp_path / "export"
        export.run(export.ExportConfig(source=str(src), label_spec=TEST_SPEC, out=out))
        return out

    return make


def put_images(s3, bucket, data, skip=(), payload=None):
    blobs = {}
    for i, img in enumerate(data["images"]):
        if img["id"] in skip:
            continue
        body = payload(img) if payload else jpeg_bytes(color=(i % 255, 10, 10))
        s3.put_object(Bucket=bucket, Key=img["serving_bucket_key"], Body=body)
        blobs[img["file_name"]] = body
    return blobs


def test_downloads_verifies_and_resumes(s3, bucket, exported, tmp_path):
    data = many_images(40)
    blobs = put_images(s3, bucket, data)
    cfg = download.DownloadConfig(export=exported(data), images_uri=f"s3://{bucket}", out=tmp_path / "img", workers=8)
    first = download.run(cfg)
    assert (first.downloaded, first.already_present, first.missing) == (40, 0, 0)
    for name, body in blobs.items():
        assert hashlib.md5((tmp_path / "img" / "images" / name).read_bytes()).digest() == hashlib.md5(body).digest()
    assert not list((tmp_path / "img").rglob("*.part"))
    assert len(tables.read_table(tmp_path / "img" / "images.csv", tables.IMAGES)) == 40

    (tmp_path / "img" / "images" / data["images"][0]["file_name"]).unlink()
    (tmp_path / "img" / "images" / data["images"][1]["file_name"]).write_bytes(b"half")  # wrong size
    second = download.run(cfg)
    assert (second.downloaded, second.already_present) == (2, 38)


def test_missing_and_corrupt_objects_are_reported(s3, bucket, exported, tmp_path):
    data = many_images(30)
    put_images(
        s3, bucket, data, skip={"p:0003"}, payload=lambda img: b"not a jpeg" if img["id"] == "p:0007" else jpeg_bytes()
    )
    cfg = download.DownloadConfig(
        export=exported(data), images_uri=f"s3://{bucket}", out=tmp_path / "img", max_missing_fraction=0.1
    )
    result = download.run(cfg)
    assert (result.downloaded, result.missing, result.corrupt) == (28, 1, 1)
    report = read_json(tmp_path / "img" / "report.json")
    wheres = {p["what"]: p["where"] for p in report["problems"]}
    assert "p:0003" in wheres["missing image"] and "p:0007" in wheres["corrupt image"]
    assert not (tmp_path / "img" / "images" / "p/cam/site/p-0007.jpg").exists()
    on_disk = tables.read_table(tmp_path / "img" / "images.csv", tables.IMAGES)
    assert set(on_disk["image_id"]).isdisjoint({"p:0003", "p:0007"})

    cfg.max_missing_fraction = 0.05
    with pytest.raises(PipelineError, match="2 of 30 images are missing or undecodable"):
        download.run(cfg)


def test_truncated_jpeg_is_corrupt(s3, bucket, exported, tmp_path):
    data = many_images(2)
    put_images(s3, bucket, data, payload=lambda img: jpeg_bytes((400, 300))[:600])
    cfg = download.DownloadConfig(
        export=exported(data), images_uri=f"s3://{bucket}", out=tmp_path / "img", max_missing_fraction=1.0
    )
    assert download.run(cfg).corrupt == 2


def test_dead_endpoint_and_bad_credentials_fail_clearly(s3, bucket, exported, tmp_path, monkeypatch):
    cfg = download.DownloadConfig(export=exported(many_images(2)), images_uri=f"s3://{bucket}", out=tmp_path / "x")
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
        with pytest.raises(PipelineError, match="cannot reach the S3 endpoint"):
            download.run(cfg)
    with monkeypatch.context() as m:
        m.setenv("AWS_ACCESS_KEY_ID", "nobody")
        with pytest.raises(PipelineError, match="S3 error") as err:
            download.run(cfg)
        assert "nobody" not in str(err.value)
    cfg.images_uri = "s3://no-such-bucket-here"
    with pytest.raises(PipelineError, match="no-such-bucket-here"):
        download.run(cfg)


def test_local_folder_source(tmp_path, exported):
    data = many_images(3)
    for img in data["images"]:
        path = tmp_path / "bucket" / img["serving_bucket_key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes())
    result = download.run(
        download.DownloadConfig(export=exported(data), images_uri=str(tmp_path / "bucket"), out=tmp_path / "img")
    )
    assert result.downloaded == 3


def test_the_source_is_listed_only_under_its_keys_common_prefix():
    from animl_retrain.stages.download import _common_prefix

    assert _common_prefix(["original/p:0001-original.jpg", "original/p:0002-original.jpg"]) == "original/p:000"
    assert _common_prefix(["original/a.jpg", "original/a.jpg.bak", "original/b.jpg"]) == "original/"
    assert _common_prefix(["a/x.jpg", "b/x.jpg"]) == "" and _common_prefix([]) == ""
    assert _common_prefix(["only.jpg"]) == "only.jpg"
