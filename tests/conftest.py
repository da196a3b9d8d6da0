"""Shared fixtures: real SeaweedFS and MLflow servers on loopback, a small demo project, and stage outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from animl_retrain.stages import cct_to_md, crop, download, export, split
from animl_retrain.tools import demo, services

SPEC = json.dumps(demo.LABEL_SPEC)


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """SeaweedFS (S3) and MLflow started for this test session, stopped by PID at the end, even on failure."""
    state = tmp_path_factory.mktemp("state")
    try:
        svc = services.start(state)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in services.client_env(svc).items():
                mp.setenv(key, value)
            yield svc
    finally:
        services.stop(state)


@pytest.fixture
def s3(servers):
    """A boto3 client for the test S3 server."""
    from animl_retrain.core.storage import s3_client

    return s3_client()


@pytest.fixture
def bucket(s3, request):
    """A fresh, empty bucket named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
    s3.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> demo.DemoResult:
    """A small demo project in local folders: 72 images at 6 locations."""
    root = tmp_path_factory.mktemp("demo")
    return demo.generate(
        str(root / "bucket"), str(root / "export.json"), str(root / "spec.json"), n_images=72, n_locations=6, seed=3
    )


@pytest.fixture(scope="session")
def stage_outputs(tmp_path_factory, small_demo) -> dict[str, Path]:
    """Outputs of export -> download -> cct-to-md -> crop -> split on the small demo (no servers needed)."""
    root = tmp_path_factory.mktemp("stages")
    out = {name: root / name for name in ("export", "images", "ground_truth", "crops", "split")}
    export.run(export.ExportConfig(source=small_demo.export_uri, label_spec=SPEC, out=out["export"]))
    download.run(download.DownloadConfig(export=out["export"], images_uri=small_demo.images_uri, out=out["images"]))
    cct_to_md.run(cct_to_md.CctToMdConfig(export=out["export"], images=out["images"], out=out["ground_truth"]))
    crop.run(crop.CropConfig(images=out["images"], ground_truth=out["ground_truth"], out=out["crops"], crop_size=32))
    split.run(split.SplitConfig(crops=out["crops"], out=out["split"], min_locs=2, trials=500))
    return out


def jpeg_bytes(size=(64, 48), color=(120, 80, 40)) -> bytes:
    """A small JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def make_export(**changes) -> dict:
    """A minimal valid Animl export (two images, three annotations) to edit in tests."""
    data = {
        "info": {"version": "1.0", "description": "test"},
        "categories": [
            {"id": 0, "name": "empty"},
            {"id": 1, "name": "Fox"},
            {"id": 2, "name": "mouse"},
            {"id": 3, "name": "deer"},
        ],
        "images": [
            {
                "id": "p:aaa",
                "file_name": "p/cam1/site_a/p-aaa.jpg",
                "serving_bucket_key": "original/p:aaa-original.jpg",
                "location": "Site A",
                "datetime": "2024-01-01T00:00:00.000-08:00",
                "width": 64,
                "height": 48,
            },
            {
                "id": "p:bbb",
                "file_name": "p/cam2/site_b/p-bbb.jpg",
                "serving_bucket_key": "original/p:bbb-original.jpg",
                "location": "Site B",
            },
        ],
        "annotations": [
            {"id": "a1", "image_id": "p:aaa", "category_id": 1, "bbox": [10, 10, 20, 10], "validated": True},
            {"id": "a2", "image_id": "p:bbb", "category_id": 2, "bbox": [5, 5, 10, 10], "validated": True},
            {"id": "a3", "image_id": "p:bbb", "category_id": 0, "bbox": [0, 0, 64, 48], "validated": True},
        ],
    }
    data.update(changes)
    return data


TEST_SPEC = json.dumps({"fox": ["fox"], "rodent": {"dataset_labels": {"animl": ["mouse", "rat"]}, "invasive": True}})


@pytest.fixture
def write_export(tmp_path):
    """Write an export dict (or raw bytes) to a file and return its path."""

    def write(data, name="export.json") -> str:
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
        return str(path)

    return write
