"""Hostile or broken input: every case ends in a clear error or a reported skip, never a crash or a silent drop.

Table-driven: each table is one class of input from docs/reliability.md (unsafe paths, bad image bytes, broken
JSON, wrong types in every field, unusable boxes), run through every stage that reads it. A "clear error" is a
:class:`PipelineError` (what the CLI prints without a traceback) naming the record or file at fault; a "reported
skip" is a ``report.json`` problem naming it, with the rest of the input processed.
"""

from __future__ import annotations

import copy
import io
import json
import re
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from animl_retrain.core.errors import PipelineError, UnsafePathError
from animl_retrain.core.io import read_json
from animl_retrain.formats import cct, layout, mdformat, tables
from animl_retrain.formats.labelspec import load_label_spec
from animl_retrain.stages import cct_to_md, crop, detect, download, export
from animl_retrain.tools import predict
from animl_retrain.vision.images import BadImageError, open_image, verify_image
from tests.conftest import TEST_SPEC, jpeg_bytes, make_export

UNSAFE_PATHS = [
    "../../etc/passwd.jpg",
    "a/../../b.jpg",
    "..",
    "/etc/passwd",
    "/abs/p-aaa.jpg",
    "a\\..\\..\\b.jpg",
    "..\\b.jpg",
    "C:/Windows/x.jpg",
    "c:x.jpg",
    "a//b.jpg",
    "./a.jpg",
    "a/./b.jpg",
    "a/",
    "a\x00b.jpg",
    "a\nb.jpg",
    "",
]


def tree(root: Path, skip: Path) -> dict[str, bytes]:
    """Every file under ``root`` except those under ``skip``, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


def run_export(path: str, out: Path, **changes) -> tuple[export.ExportResult, dict]:
    result = export.run(export.ExportConfig(source=path, label_spec=TEST_SPEC, out=out, **changes))
    return result, read_json(out / "report.json")


# --- paths that would leave their folder ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["file_name", "serving_bucket_key"])
@pytest.mark.parametrize("value", UNSAFE_PATHS, ids=repr)
def test_unsafe_paths_in_the_export_are_skipped_and_reported(write_export, tmp_path, field, value):
    data = make_export()
    data["images"][0][field] = value
    if field == "serving_bucket_key" and not value:  # no key at all: the export is broken, not one record
        with pytest.raises(PipelineError, match=r"images\[0\] \(id 'p:aaa'\): needs 'serving_bucket_key'"):
            run_export(write_export(data), tmp_path / "out")
        return
    result, report = run_export(write_export(data), tmp_path / "out")
    assert result.classes == {"rodent": 1}  # the other image is kept
    assert report["problem_counts"] == {f"unsafe {field}": 1}
    assert report["problems"][0]["where"] == "image 'p:aaa'"
    images = tables.read_table(tmp_path / "out" / "images.csv", tables.IMAGES)
    assert list(images["image_id"]) == ["p:bbb"]


def image_row(name: str, **changes) -> dict:
    row = {
        "image_id": name,
        "file": name,
        "key": name,
        "location": "a",
        "datetime": "",
        "width": 64,
        "height": 48,
        "n_objects": 1,
        "animl_labels": "fox",
        "needs_detection": False,
    }
    return {**row, **changes}


@pytest.mark.parametrize("column", ["file", "key"])
@pytest.mark.parametrize("value", ["../secret/x.jpg", "/etc/hostname", "a\\..\\..\\secret\\x.jpg"], ids=repr)
def test_a_tampered_image_table_never_reads_or_writes_outside(tmp_path, column, value):
    """The export stage skips unsafe paths; download, cct-to-md and detect re-check the table they are given."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "x.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "ok.jpg").write_bytes(jpeg_bytes())
    rows = [image_row("ok.jpg"), image_row("bad.jpg", **{column: value})]
    tables.write_table(pd.DataFrame(rows), tmp_path / "export" / "images.csv", tables.IMAGES)
    before = tree(tmp_path, tmp_path / "out")

    with pytest.raises(UnsafePathError, match=f"{'file' if column == 'file' else 'image key'} .* (absolute|'\\.\\.')"):
        download.run(
            download.DownloadConfig(
                export=tmp_path / "export", images_uri=str(tmp_path / "bucket"), out=tmp_path / "out"
            )
        )
    assert tree(tmp_path, tmp_path / "out") == before
    assert not (tmp_path / "out" / layout.IMAGES_DIR / "ok.jpg").exists()  # refused before fetching anything

    # cct-to-md and detect are handed the same table as if it came from the download stage
    tables.write_table(pd.DataFrame(rows), tmp_path / "images" / "images.csv", tables.IMAGES)
    objects = pd.DataFrame(
        [
            {"annotation_id": "a", "image_id": r["image_id"], "file": r["file"], "label": "fox", "animl_label": "fox"}
            | {"x": 1.0, "y": 1.0, "w": 5.0, "h": 5.0, "validated": True, "location": "a"}
            for r in rows
        ]
    )
    tables.write_table(objects, tmp_path / "export" / "objects.csv", tables.OBJECTS)
    (tmp_path / "export" / "label_spec.json").write_text(json.dumps({"fox": {"dataset_labels": {"animl": ["fox"]}}}))
    mdformat.write_results(tmp_path / "gt.json", mdformat.new_results("ground truth"))
    if column == "file":
        rows[1]["width"] = rows[1]["height"] = None  # the size must come from the file's header
        tables.write_table(pd.DataFrame(rows), tmp_path / "images" / "images.csv", tables.IMAGES)
        with pytest.raises(UnsafePathError):
            cct_to_md.run(
                cct_to_md.CctToMdConfig(export=tmp_path / "export", images=tmp_path / "images", out=tmp_path / "md")
            )
        with pytest.raises(UnsafePathError):
            detect.run(
                detect.DetectConfig(images=tmp_path / "images", ground_truth=tmp_path / "gt.json", out=tmp_path / "d")
            )
    assert not (tmp_path / "out" / "secret").exists()  # where images/../secret would have landed
    assert tree(tmp_path / "secret", tmp_path / "out") == {"x.jpg": jpeg_bytes()}


# --- image bytes: bombs, absurd sizes, truncation, things that are not images -----------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds a few bytes of data: a decompression bomb's
    header (decoding it would need width * height * 3 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to declare another size."""
    data = bytearray(jpeg_bytes((64, 48)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def whole_jpeg(size=(400, 300)) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


# name -> (bytes, max_pixels, the reason the message must give)
BAD_IMAGES = {
    "png bomb 100k x 100k": (png_header_only(100_000, 100_000), None, "decompression bomb"),
    "png over PIL's own guard": (png_header_only(200_000, 200_000), 10**12, "decompression bomb"),
    "jpeg declaring 65000 x 65000": (jpeg_declaring(65_000, 65_000), None, "decompression bomb"),
    "png 9000 x 9000 under PIL's guard": (png_header_only(9_000, 9_000), 50_000_000, "over the ceiling"),
    "over the configured ceiling": (whole_jpeg(), 10_000, "over the ceiling"),
    "jpeg declaring 0 x 0": (jpeg_declaring(0, 0), None, "cannot decode"),
    "truncated jpeg (header only)": (whole_jpeg()[:600], None, "cannot decode"),
    "truncated jpeg (tail cut)": (whole_jpeg()[:-2000], None, "cannot decode"),
    "html error page named .jpg": (b"<html><body>403 Forbidden</body></html>", None, "cannot decode"),
    "empty file": (b"", None, "cannot decode"),
    "random bytes": (bytes(range(256)) * 20, None, "cannot decode"),
}


def test_pillows_own_bomb_guard_stays_on():
    import animl_retrain.modeling.detector
    import animl_retrain.serving.http

    # imported: modules that could loosen Pillow's globals
    assert animl_retrain.modeling.detector and animl_retrain.serving.http

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 200_000_000


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_bytes_are_refused_by_every_decoder(tmp_path, name):
    data, max_pixels, reason = BAD_IMAGES[name]
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    limit = {"max_pixels": max_pixels} if max_pixels else {}
    with pytest.raises(BadImageError, match=f"(?i){reason}"):
        verify_image(path, **limit)  # the download stage's check
    with pytest.raises(BadImageError, match=f"(?i){reason}"):
        open_image(path, **limit)  # crop, detect, predict and serving decode with this
    with pytest.raises(BadImageError):
        open_image(io.BytesIO(data), **limit)


@pytest.fixture(scope="module")
def bad_image_project(tmp_path_factory):
    """A folder of images: one good one, and every bad one of BAD_IMAGES under its own name."""
    root = tmp_path_factory.mktemp("bad-images")
    names = {"good.jpg": jpeg_bytes((64, 48))} | {
        f"bad{i}.jpg": BAD_IMAGES[name][0] for i, name in enumerate(BAD_IMAGES) if BAD_IMAGES[name][1] is None
    }
    for name, data in names.items():
        (root / "bucket" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "bucket" / name).write_bytes(data)
    rows = [image_row(name) for name in names]
    tables.write_table(pd.DataFrame(rows), root / "export" / "images.csv", tables.IMAGES)
    return root, sorted(names)


def test_download_reports_every_bad_image_and_keeps_the_good_one(bad_image_project, tmp_path):
    root, names = bad_image_project
    cfg = download.DownloadConfig(
        export=root / "export", images_uri=str(root / "bucket"), out=tmp_path / "img", max_missing_fraction=1.0
    )
    result = download.run(cfg)
    assert (result.downloaded, result.corrupt) == (1, len(names) - 1)
    report = read_json(tmp_path / "img" / "report.json")
    assert sorted(p["where"].split("'")[1] for p in report["problems"]) == sorted(n for n in names if n != "good.jpg")
    assert [p.name for p in (tmp_path / "img" / layout.IMAGES_DIR).iterdir()] == ["good.jpg"]  # no bad file kept
    cfg.max_missing_fraction = 0.5
    with pytest.raises(PipelineError, match=f"{len(names) - 1} of {len(names)} images are missing or undecodable"):
        download.run(cfg)


def test_crop_reports_every_bad_image_and_crops_the_good_one(bad_image_project, tmp_path):
    """Images that changed on disk after the download check (or a download run without --verify)."""
    root, names = bad_image_project
    images = tmp_path / "images"
    (images / layout.IMAGES_DIR).mkdir(parents=True)
    for name in names:
        (images / layout.IMAGES_DIR / name).write_bytes((root / "bucket" / name).read_bytes())
    tables.write_table(pd.DataFrame([image_row(n) for n in names]), images / "images.csv", tables.IMAGES)
    gt = mdformat.new_results("ground truth", classification_labels=["fox"])
    gt["images"] = [
        {"file": n, "detections": [{"category": "1", "conf": 1.0, "bbox": [0.1, 0.1, 0.5, 0.5], "annotation_id": n,
                                    "classifications": [["0", 1.0]]}]}
        for n in names
    ]  # fmt: skip
    mdformat.write_results(tmp_path / "gt.json", gt)
    result = crop.run(
        crop.CropConfig(
            images=images, ground_truth=tmp_path / "gt.json", out=tmp_path / "crops", crop_size=16, workers=1
        )
    )
    assert (result.crops, result.failed_images) == (1, len(names) - 1)
    report = read_json(tmp_path / "crops" / "report.json")
    assert report["problem_counts"] == {"unreadable image": len(names) - 1}


def test_serving_answers_400_to_every_bad_image():
    import base64

    from animl_retrain.serving import http as serving
    from animl_retrain.serving import request as animl_request

    class NoModel:  # parse and decode run before the model: a request that gets this far is a bug
        labels = ("a",)

        def classify(self, images, boxes):
            from animl_retrain.vision.preprocessing import Preprocessing

            Preprocessing(image_size=16).crop_from_image(images[0], boxes[0])
            raise AssertionError("a bad image was decoded")

    handler = serving.AnimlHandler(NoModel())
    for name, (data, max_pixels, _) in BAD_IMAGES.items():
        if max_pixels:  # serving uses the default ceiling
            continue
        body = json.dumps({"image": base64.b64encode(data).decode(), "bbox": [0, 0, 1, 1]})
        with pytest.raises(animl_request.BadRequest) as e:
            handler.predict(body)
        assert e.value.status == 400, name


# --- JSON: huge, deeply nested, wrong types in every field -------------------------------------------------------


def test_an_export_over_the_configured_size_is_refused_unread(write_export, tmp_path):
    data = make_export()
    data["info"]["padding"] = "x" * (2 << 20)
    with pytest.raises(PipelineError, match="over the limit of 1048576"):
        run_export(write_export(data), tmp_path / "out", max_export_mb=1)
    assert not (tmp_path / "out").exists()


NESTED = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"images": ' + NESTED + b', "categories": [], "annotations": []}', "nested too deeply"),
        (b'{"info": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}", "nested too deeply"),
        (b'{"images": [' + b"9" * 5000 + b"]}", "not valid JSON"),  # more digits than Python converts
        (b"\xef\xbb\xbf" + json.dumps(make_export()).encode()[:-1], "not valid JSON"),
        (b"", "not valid JSON"),
        (b"null", "top level must be a JSON object"),
    ],
    ids=["nested list", "nested object", "5000-digit number", "cut short", "empty", "null"],
)
def test_broken_export_json_is_a_clear_error(write_export, tmp_path, raw, message):
    with pytest.raises(PipelineError, match=message):
        run_export(write_export(raw), tmp_path / "out")


@pytest.mark.parametrize(
    "raw", [NESTED, b"\xff\xfe", b'{"a": [' + b"1" * 5000 + b"]}"], ids=["nested", "not utf-8", "5000 digits"]
)
def test_broken_label_spec_and_results_files_are_clear_errors(tmp_path, raw):
    path = tmp_path / "x.json"
    path.write_bytes(raw)
    with pytest.raises(PipelineError, match=r"label spec .*(nested|UTF-8|not valid JSON)"):
        load_label_spec(str(path))
    with pytest.raises(PipelineError, match=r"MegaDetector results file .*(nested|UTF-8|not valid JSON)"):
        mdformat.read_results(path)


WRONG_VALUES = [None, True, 1.5, -3, 0, 10**400, "", "x", [], [1, 2], {}, {"a": 1}, float("nan"), float("inf")]
# (record kind, field) -> the wrong values it must refuse; every other value may be accepted where it is harmless
# (an 'id' of -3, a 'datetime' of "x"), but never crash the stage.
MUST_REFUSE = {
    ("categories", "id"): [None, True, 1.5, "", "x", [], {}, float("nan")],
    ("categories", "name"): [None, True, 1.5, -3, "", [], {}],
    ("images", "id"): [None, True, 1.5, "", [], {}, float("nan")],
    ("images", "file_name"): [None, True, 1.5, -3, [], {}],
    ("images", "serving_bucket_key"): [None, True, 1.5, -3, "", [], {}],
    ("images", "width"): [True, 1.5, -3, 0, 10**400, "x", [], {}, float("nan"), float("inf")],
    ("images", "height"): [True, 1.5, -3, 0, 10**400, "x", [], {}, float("nan"), float("inf")],
    ("images", "location"): [True, 1.5, -3, [], {}],
    ("images", "datetime"): [True, 1.5, -3, [], {}],
    ("annotations", "id"): [None, True, 1.5, "", [], {}],
    ("annotations", "image_id"): [None, True, 1.5, -3, "", "x", [], {}],
    ("annotations", "category_id"): [None, True, 1.5, -3, 10**400, "", "1", [], {}, float("nan")],
    ("annotations", "bbox"): WRONG_VALUES,
    ("annotations", "validated"): [1.5, -3, "", "x", [], {}, float("nan")],
}


def wrong_type_cases():
    for kind, field in MUST_REFUSE:
        for value in WRONG_VALUES:
            yield pytest.param(kind, field, value, id=f"{kind}.{field}={value!r:.12}")
    for kind in ("categories", "images", "annotations", "info"):
        for value in WRONG_VALUES:
            yield pytest.param(kind, None, value, id=f"{kind}={value!r:.12}")
    for i in range(4):
        for value in (None, True, 10**400, float("nan"), "1", [1, 2, 3, 4, 5]):
            yield pytest.param("annotations", ("bbox", i), value, id=f"annotations.bbox[{i}]={value!r:.12}")


def _listed(value, values) -> bool:
    return any(v is value or (type(v) is type(value) and (v == value or (v != v and value != value))) for v in values)


NAMES_THE_RECORD = r"(categories|images|annotations)\[\d+\]|top-level '\w+'|no annotation is left"


@pytest.mark.parametrize(("kind", "field", "value"), list(wrong_type_cases()))
def test_wrong_types_in_every_field_never_crash(write_export, tmp_path, kind, field, value):
    """Each case ends in a PipelineError naming the record, a reported skip, or (where harmless) a normal run."""
    data = make_export()
    if field is None:
        data[kind] = value  # the whole top-level entry
    elif isinstance(field, tuple):
        data[kind][0][field[0]][field[1]] = value
    else:
        data[kind][0][field] = value
    try:
        run_export(write_export(data), tmp_path / "out")
    except PipelineError as e:
        assert re.search(NAMES_THE_RECORD, str(e)), str(e)
        return
    must_refuse = isinstance(field, tuple) or (field is None and kind != "info")
    if must_refuse or _listed(value, MUST_REFUSE.get((kind, field), [])):
        # accepted only as a reported skip of that image (an unsafe file_name or key)
        report = read_json(tmp_path / "out" / "report.json")
        assert [p["where"] for p in report["problems"]] == ["image 'p:aaa'"], (kind, field, value)


# --- boxes: outside the image, zero-area, NaN --------------------------------------------------------------------

EXPORT_BOXES = {
    "NaN": ("[NaN, 1, 5, 5]", "finite numbers"),
    "Infinity": ("[1, 1, Infinity, 5]", "finite numbers"),
    "1e400": ("[1, 1, 1e400, 5]", "finite numbers"),
    "400-digit int": ("[1, 1, " + "9" * 400 + ", 5]", "finite numbers"),
    "zero width": ("[1, 1, 0, 5]", "negative or zero size"),
    "negative height": ("[1, 1, 5, -5]", "negative or zero size"),
    "three numbers": ("[1, 1, 5]", "finite numbers"),
    "strings": ('["1", "1", "5", "5"]', "finite numbers"),
}


@pytest.mark.parametrize("name", EXPORT_BOXES)
def test_unusable_export_boxes_are_structural_errors(write_export, tmp_path, name):
    text, message = EXPORT_BOXES[name]
    raw = json.dumps(make_export()).replace("[10, 10, 20, 10]", text).encode()
    with pytest.raises(PipelineError, match=rf"annotations\[0\] \(id 'a1'\).*{message}"):
        run_export(write_export(raw), tmp_path / "out")


@pytest.mark.parametrize(
    ("bbox", "reported"),
    [([70, 10, 5, 5], True), ([10, 60, 5, 5], True), ([-30, -30, 10, 10], True), ([60, 40, 20, 20], False)],
    ids=["right of the frame", "below the frame", "above-left of the frame", "partly outside: clipped"],
)
def test_ground_truth_boxes_outside_the_frame_are_reported(tmp_path, bbox, reported):
    data = make_export()
    data["annotations"][0]["bbox"] = bbox  # image p:aaa is 64 x 48
    src = tmp_path / "export.json"
    src.write_text(json.dumps(data))
    export.run(export.ExportConfig(source=str(src), label_spec=TEST_SPEC, out=tmp_path / "export"))
    bucket = tmp_path / "bucket"
    for img in data["images"]:
        (bucket / img["serving_bucket_key"]).parent.mkdir(parents=True, exist_ok=True)
        (bucket / img["serving_bucket_key"]).write_bytes(jpeg_bytes())
    download.run(download.DownloadConfig(export=tmp_path / "export", images_uri=str(bucket), out=tmp_path / "img"))
    result = cct_to_md.run(
        cct_to_md.CctToMdConfig(export=tmp_path / "export", images=tmp_path / "img", out=tmp_path / "md")
    )
    report = read_json(tmp_path / "md" / "report.json")
    if reported:
        assert result.skipped == 1 and report["problems"][0]["what"] == "box outside the frame"
        assert "'a1'" in report["problems"][0]["where"]
    else:
        assert (result.skipped, result.clipped) == (0, 1)


MD_BOXES = {
    "NaN": [float("nan"), 0.1, 0.2, 0.2],
    "infinite": [0.1, 0.1, float("inf"), 0.2],
    "400-digit int": [0.1, 0.1, 10**400, 0.2],
    "zero area": [0.1, 0.1, 0.0, 0.2],
    "negative size": [0.1, 0.1, 0.2, -0.2],
    "right of the frame": [1.2, 0.1, 0.2, 0.2],
    "above the frame": [0.1, -0.5, 0.2, 0.2],
}


@pytest.fixture
def md_project(tmp_path):
    """Two downloaded images and a ground-truth file with one good box on each."""
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg"):
        (images / layout.IMAGES_DIR / name).parent.mkdir(parents=True, exist_ok=True)
        (images / layout.IMAGES_DIR / name).write_bytes(jpeg_bytes((64, 48)))
    tables.write_table(pd.DataFrame([image_row("a.jpg"), image_row("b.jpg")]), images / "images.csv", tables.IMAGES)
    gt = mdformat.new_results("ground truth", classification_labels=["fox"])
    gt["images"] = [
        {"file": name, "detections": [det(f"{name}-good", [0.1, 0.1, 0.5, 0.5])]} for name in ("a.jpg", "b.jpg")
    ]
    return images, gt


def det(annotation_id: str, bbox: list) -> dict:
    return {"category": "1", "conf": 1.0, "bbox": bbox, "annotation_id": annotation_id, "classifications": [["0", 1.0]]}


@pytest.mark.parametrize("name", MD_BOXES)
def test_unusable_boxes_in_results_files_are_reported_by_crop(md_project, tmp_path, name):
    images, gt = md_project
    gt["images"][0]["detections"].append(det("bad", MD_BOXES[name]))
    mdformat.write_results(tmp_path / "gt.json", gt)
    result = crop.run(
        crop.CropConfig(
            images=images, ground_truth=tmp_path / "gt.json", out=tmp_path / "crops", crop_size=16, workers=1
        )
    )
    assert result.crops == 2  # the good boxes of both images
    report = read_json(tmp_path / "crops" / "report.json")
    assert [(p["what"], p["where"]) for p in report["problems"]] == [("unusable box", "a.jpg")]
    assert "detection bad" in report["problems"][0]["detail"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from tests.serving_support import tiny_checkpoint

    folder = tmp_path_factory.mktemp("model")
    tiny_checkpoint(folder / "model.pt")
    return folder


def run_predict(images: Path, results: dict, model: Path, out: Path) -> tuple[predict.PredictResult, dict, dict]:
    mdformat.write_results(out.parent / "detections.json", results)
    result = predict.run(
        predict.PredictConfig(
            model=model, images=images / layout.IMAGES_DIR, detections=out.parent / "detections.json", out=out
        )
    )
    return result, read_json(out / predict.RESULTS_FILE), read_json(out / "report.json")


def test_unusable_boxes_are_left_unclassified_and_reported_by_predict(md_project, model_folder, tmp_path):
    images, gt = md_project
    for name, bbox in MD_BOXES.items():
        gt["images"][0]["detections"].append(det(name, bbox))
    result, classified, report = run_predict(images, gt, model_folder, tmp_path / "out")
    assert result.classified == 2 and report["counts"]["unusable_boxes"] == len(MD_BOXES)
    assert report["problem_counts"] == {"box not classified": len(MD_BOXES)}
    dets = classified["images"][0]["detections"]
    assert "classifications" in dets[0] and not any("classifications" in d for d in dets[1:])


@pytest.mark.parametrize("file", ["../secret.jpg", "/etc/hostname", "..\\secret.jpg", "a/../../secret.jpg"], ids=repr)
def test_unsafe_results_file_entries_are_skipped(md_project, model_folder, tmp_path, file):
    images, gt = md_project
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes((64, 48)))  # what ../secret.jpg would reach from images/
    gt["images"].append({"file": file, "detections": [det("outside", [0.1, 0.1, 0.5, 0.5])]})
    result, _, report = run_predict(images, gt, model_folder, tmp_path / "out")
    assert (result.classified, result.skipped_images) == (2, 1)
    assert report["problems"][0]["where"] == file and "results file entry" in report["problems"][0]["detail"]

    mdformat.write_results(tmp_path / "gt.json", gt)
    crop_result = crop.run(
        crop.CropConfig(
            images=images, ground_truth=tmp_path / "gt.json", out=tmp_path / "crops", crop_size=16, workers=1
        )
    )
    assert crop_result.crops == 2
    crop_report = read_json(tmp_path / "crops" / "report.json")
    assert crop_report["problems"] == [{"what": "box on an image that is not downloaded", "where": file, "detail": ""}]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(images={}), "no 'images' list"),
        (lambda r: r.pop("detection_categories"), "no 'detection_categories'"),
        (lambda r: r["images"][0].update(file=None), r"images\[0\] has no 'file'"),
        (lambda r: r["images"][0].update(detections="a"), "'detections' must be a list"),
        (lambda r: r["images"][0]["detections"][0].update(bbox=[True, 0, 1, 1]), "no valid 'bbox'"),
        (lambda r: r["images"][0]["detections"][0].update(bbox="0 0 1 1"), "no valid 'bbox'"),
        (lambda r: r["images"][0]["detections"][0].update(conf="high"), "'conf' must be a number"),
        (lambda r: r["images"][0]["detections"][0].update(category=1), "'category' must be a string"),
        (lambda r: r["images"][0].update(detections=[7]), "no valid 'bbox'"),
    ],
)
def test_wrong_types_in_results_files_are_clear_errors(md_project, tmp_path, mutate, message):
    _, gt = md_project
    bad = copy.deepcopy(gt)
    mutate(bad)
    mdformat.write_results(tmp_path / "gt.json", bad)
    with pytest.raises(PipelineError, match=message):
        mdformat.read_results(tmp_path / "gt.json")


def test_cct_module_refuses_the_bool_category_id_json_would_equate_with_1():
    data = make_export()
    data["annotations"][0]["category_id"] = True
    with pytest.raises(PipelineError, match=r"annotations\[0\] \(id 'a1'\): category_id True"):
        cct.parse(data, "export")
