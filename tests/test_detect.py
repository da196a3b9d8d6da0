import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.formats import layout, mdformat, tables
from animl_retrain.modeling import detector
from animl_retrain.stages import cct_to_md, crop, detect, download, export
from tests import tiny_detector
from tests.test_cct_to_md import validate

SPEC = json.dumps({"fox": ["fox"], "rodent": ["mouse"]})
SIZE = 320  # network input for the tests: small, so the whole path runs in seconds


# --- letterbox, decoding, NMS and mapping, against numbers worked out by hand ----------------------------------


def test_letterbox_geometry_hand_computed():
    g = detector.letterbox_geometry(2048, 1536, 1280)  # 4:3: 1280x960 is a multiple of 64, no padding
    assert (g.resized_width, g.resized_height, g.left, g.top, g.input_width, g.input_height) == (
        1280,
        960,
        0,
        0,
        1280,
        960,
    )
    g = detector.letterbox_geometry(1920, 1080, 1280)  # 16:9: 720 high, padded by 48 to 768, 24 above
    assert (g.resized_width, g.resized_height, g.left, g.top, g.input_width, g.input_height) == (
        1280,
        720,
        0,
        24,
        1280,
        768,
    )
    g = detector.letterbox_geometry(1080, 1920, 1280)  # portrait: the padding goes left and right
    assert (g.resized_width, g.resized_height, g.left, g.top, g.input_width, g.input_height) == (
        720,
        1280,
        24,
        0,
        768,
        1280,
    )
    g = detector.letterbox_geometry(320, 240, 1280)  # small images are scaled up, as YOLOv5 does
    assert (g.resized_width, g.resized_height, g.input_width, g.input_height) == (1280, 960, 1280, 960)
    g = detector.letterbox_geometry(1000, 999, 640)  # 639 high: one pixel of padding, below (YOLOv5's rounding)
    assert (g.resized_height, g.top, g.input_height) == (639, 0, 640)
    g = detector.letterbox_geometry(1920, 1080, 1280, fixed=(1280, 1280))  # a fixed-shape model: a square
    assert (g.resized_width, g.resized_height, g.left, g.top, g.input_width, g.input_height) == (
        1280,
        720,
        0,
        280,
        1280,
        1280,
    )


def test_letterboxed_pixels_are_padded_grey_and_decoded_at_reduced_scale(tmp_path):
    img = Image.new("RGB", (2560, 1440), (200, 30, 30))
    img.save(tmp_path / "wide.jpg", quality=95)
    pixels, g = detector.load_letterboxed(tmp_path / "wide.jpg", 640)
    assert pixels.shape == (g.input_height, g.input_width, 3) == (384, 640, 3)
    assert g.top == 12 and (pixels[: g.top] == detector.PAD_VALUE).all() and (pixels[-g.top :] == 114).all()
    assert np.abs(pixels[g.top + 5 : g.top + 300].astype(int) - (200, 30, 30)).max() <= 3
    assert detector._draft_factor(2560, 1440, g) == 4  # 640x360 is exactly what a 1/4 JPEG decode gives


def test_full_decode_matches_megadetector_preprocessing_exactly(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (27, 48, 3), dtype=np.uint8)
    Image.fromarray(small).resize((2560, 1440), Image.BICUBIC).save(tmp_path / "f.jpg", quality=90)
    # MegaDetector's classic mode, by hand: decode in full, INTER_LINEAR to 1280x720, grey 114 to 768 high
    full = np.asarray(Image.open(tmp_path / "f.jpg").convert("RGB"))
    resized = cv2.resize(full, (1280, 720), interpolation=cv2.INTER_LINEAR)
    expected = cv2.copyMakeBorder(resized, 24, 24, 0, 0, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    exact, _ = detector.load_letterboxed(tmp_path / "f.jpg", 1280, reduced_decode=False)
    assert np.array_equal(exact, expected)
    reduced, _ = detector.load_letterboxed(tmp_path / "f.jpg", 1280)  # decoded at 1/2 scale: close, not equal
    assert 0 < np.abs(reduced.astype(float) - expected).mean() < 6


def test_decode_predictions_filters_and_suppresses_per_class():
    def row(cx, cy, w, h, obj, cls):
        scores = [0.0, 0.0, 0.0]
        scores[cls] = 0.8
        return [cx, cy, w, h, obj, *scores]

    pred = np.array(
        [
            row(100, 100, 40, 20, 0.9, 0),  # conf 0.72: kept
            row(102, 100, 40, 20, 0.8, 0),  # same place, same class, 0.64: suppressed
            row(100, 100, 40, 20, 0.7, 1),  # same place, person, 0.56: kept (NMS is per class)
            row(300, 50, 10, 10, 0.05, 0),  # conf 0.04: kept at threshold 0.005
            row(300, 300, 10, 10, 0.004, 2),  # objectness under the threshold: dropped
        ],
        dtype=np.float32,
    )
    rows = detector.decode_predictions(pred, 0.005)
    assert rows[:, 4] == pytest.approx([0.72, 0.56, 0.04])
    assert rows[:, 5].tolist() == [0, 1, 0]
    assert rows[0, :4] == pytest.approx([80, 90, 120, 110])  # cx, cy, w, h -> x1, y1, x2, y2
    assert len(detector.decode_predictions(pred, 0.6)) == 1


def test_boxes_map_back_to_the_original_image():
    g = detector.letterbox_geometry(1920, 1080, 1280)  # input 1280x768, image at rows 24..744
    rows = np.array(
        [
            [128, 24 + 72, 256, 24 + 144, 0.91234, 0],  # 1/10 of the frame at (0.1, 0.1)
            [0, 0, 64, 24 + 36, 0.5, 1],  # reaches into the top padding: clipped to the frame
            [0, 0, 64, 20, 0.4, 2],  # wholly in the padding: dropped
        ],
        dtype=np.float32,
    )
    dets = detector.to_md_detections(rows, g)
    assert dets[0] == {"category": "1", "conf": 0.912, "bbox": [0.1, 0.1, 0.1, 0.1]}
    assert dets[1]["category"] == "2" and dets[1]["bbox"] == [0.0, 0.0, 0.05, 0.05]
    assert len(dets) == 2 and all(isinstance(d["conf"], float) for d in dets)


# --- the stage on a small Animl-shaped project ----------------------------------------------------------------

# image id -> (size, white rectangle (x0, y0, x1, y1) or None, labels, box of each label or None for full frame)
PROJECT = {
    "p:i1": ((640, 480), (160, 120, 320, 240), ["fox"], None),
    "p:i2": ((1280, 720), (640, 360, 960, 540), ["mouse"], None),
    "p:i3": ((480, 640), (48, 64, 240, 320), ["fox"], None),  # no width/height in the export
    "p:i4": ((640, 480), (400, 300, 480, 380), ["fox"], [100, 100, 50, 50]),  # a validated box: ground truth wins
    "p:i5": ((640, 480), (64, 48, 192, 144), ["fox", "mouse"], None),  # two labels: ambiguous
    "p:i6": ((640, 480), (64, 48, 192, 144), ["fox"], None),  # corrupted after download
    "p:i7": ((640, 480), None, ["mouse"], None),  # nothing for the detector to find
}
EXPECTED = {  # the white rectangle normalised to its image: what the detector must report
    "p:i1": [0.25, 0.25, 0.25, 0.25],
    "p:i2": [0.5, 0.5, 0.25, 0.25],
    "p:i3": [0.1, 0.1, 0.4, 0.4],
}


def _file(iid):
    return f"p/cam/site/{iid.replace(':', '-')}.jpg"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect-project")
    categories = [{"id": 0, "name": "empty"}, {"id": 1, "name": "fox"}, {"id": 2, "name": "mouse"}]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for iid, (size, rect, labels, box) in PROJECT.items():
        img = Image.new("RGB", size, (40, 70, 30))
        if rect:
            img.paste((255, 255, 255), rect)
        key = f"original/{iid}-original.jpg"
        (root / "bucket" / "original").mkdir(parents=True, exist_ok=True)
        img.save(root / "bucket" / key, quality=95)
        record = {"id": iid, "file_name": _file(iid), "serving_bucket_key": key, "location": f"site {iid[-1]}"}
        if iid != "p:i3":
            record.update(width=size[0], height=size[1])
        images.append(record)
        for k, label in enumerate(labels):
            bbox = box or [0, 0, size[0], size[1]]
            annotations.append(
                {"id": f"{iid}-a{k}", "image_id": iid, "category_id": cat_id[label], "bbox": bbox, "validated": True}
            )
    (root / "export.json").write_text(
        json.dumps({"categories": categories, "images": images, "annotations": annotations})
    )
    out = {name: root / name for name in ("export", "images", "ground_truth")}
    export.run(export.ExportConfig(source=str(root / "export.json"), label_spec=SPEC, out=out["export"]))
    download.run(download.DownloadConfig(export=out["export"], images_uri=str(root / "bucket"), out=out["images"]))
    corrupt = out["images"] / layout.IMAGES_DIR / _file("p:i6")
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    cct_to_md.run(cct_to_md.CctToMdConfig(export=out["export"], images=out["images"], out=out["ground_truth"]))
    out["model"] = tiny_detector.export(root / "tiny.onnx")
    out["root"] = root
    return out


def run_detect(project, out, **changes):
    values = dict(
        images=project["images"],
        ground_truth=project["ground_truth"],
        out=out,
        weights=str(project["model"]),
        image_size=SIZE,
        batch_size=2,
        workers=1,
        device="cpu",
    )
    values.update(changes)
    result = detect.run(detect.DetectConfig(**values))
    return result, read_json(Path(out) / layout.DETECTIONS_FILE), read_json(Path(out) / "report.json")


@pytest.fixture(scope="module")
def detected(project, tmp_path_factory):
    return run_detect(project, tmp_path_factory.mktemp("detections"))


def by_id(results):
    return {im["file"].rsplit("/", 1)[1].replace("-", ":", 1)[:-4]: im for im in results["images"]}


def test_export_and_download_mark_and_fetch_images_needing_detection(project):
    images = tables.read_table(project["export"] / "images.csv", tables.IMAGES).set_index("image_id")
    assert images["needs_detection"].to_dict() == {iid: iid != "p:i4" for iid in PROJECT}
    report = read_json(project["images"] / "report.json")
    assert report["counts"]["wanted"] == 7 and report["counts"]["wanted_for_detection"] == 6


def test_detector_finds_the_hand_computed_boxes(detected, project):
    result, results, report = detected
    images = by_id(results)
    assert set(images) == set(PROJECT) - {"p:i4"}  # i4 has a validated box
    for iid, expected in EXPECTED.items():
        dets = images[iid]["detections"]
        assert [d["category"] for d in dets] == ["1", "2", "1"]  # animal 0.9, person 0.5, animal 0.1
        assert [d["conf"] for d in dets] == [0.9, 0.5, 0.1]
        assert dets[0]["bbox"] == pytest.approx(expected, abs=0.01)
        assert dets[2]["bbox"][2] == pytest.approx(expected[2] / 4, abs=0.01)
    assert images["p:i6"]["failure"] == mdformat.FAILURE_IMAGE_OPEN and images["p:i6"]["detections"] is None
    assert images["p:i7"]["detections"] == []
    assert result.animal_images == 4 and result.person_detections == 4 and result.vehicle_detections == 0
    assert result.failed == 1 and report["problems"][0]["what"] == "unreadable image"
    info = results["info"]
    assert info["detector_metadata"]["typical_detection_threshold"] == 0.2
    assert info["detection_settings"]["provider"] == "CPUExecutionProvider"


def test_results_file_passes_megadetector_validator(detected, tmp_path):
    _, results, _ = detected
    (tmp_path / "d.json").write_text(json.dumps(results))
    validate(tmp_path / "d.json")


def test_crop_takes_detector_boxes_where_no_box_locates_the_animal(project, detected, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(detected[1]))  # a results file works as well as its folder
    crop.run(
        crop.CropConfig(
            images=project["images"],
            ground_truth=project["ground_truth"],
            detections=tmp_path / "d.json",
            out=tmp_path / "crops",
            crop_size=32,
            workers=1,
        )
    )
    crops = tables.read_table(tmp_path / "crops" / "crops.csv", tables.CROPS).set_index("image_id")
    report = read_json(tmp_path / "crops" / "report.json")
    assert sorted(crops.index) == ["p:i1", "p:i2", "p:i3", "p:i4"]  # one crop each: no person, nothing under 0.2
    assert crops.loc["p:i4", "box_source"] == "ground_truth"
    assert crops.loc["p:i4", ["x", "y", "w", "h"]].tolist() == pytest.approx(
        [100 / 640, 100 / 480, 50 / 640, 50 / 480], abs=1e-6
    )
    for iid, expected in EXPECTED.items():
        row = crops.loc[iid]
        assert row["box_source"] == "detector" and row["conf"] == 0.9
        assert [row.x, row.y, row.w, row.h] == pytest.approx(expected, abs=0.01)
    assert crops.loc["p:i2", "label"] == "rodent" and crops.loc["p:i1", "label"] == "fox"
    problems = {p["where"].rsplit("/", 1)[1]: p["what"] for p in report["problems"]}
    assert problems["p-i5.jpg"] == "ambiguous image label"
    assert problems["p-i7.jpg"] == "no animal found by the detector"
    assert report["detections_not_animal"] == {"person": 4}  # counted, never cropped
    assert report["per_box_source"] == {"detector": 3, "ground_truth": 1}


def test_crop_box_source_choices(project, detected, tmp_path):
    det_file = tmp_path / "d.json"
    det_file.write_text(json.dumps(detected[1]))
    common = dict(images=project["images"], ground_truth=project["ground_truth"], crop_size=32, workers=1)
    crop.run(crop.CropConfig(**common, detections=det_file, out=tmp_path / "gt", box_source="ground_truth"))
    gt = tables.read_table(tmp_path / "gt" / "crops.csv", tables.CROPS)
    assert set(gt["box_source"]) == {"ground_truth"} and len(gt) == 7  # every label but corrupt i6, full frames too
    crop.run(crop.CropConfig(**common, detections=det_file, out=tmp_path / "det", box_source="detector"))
    det = tables.read_table(tmp_path / "det" / "crops.csv", tables.CROPS)
    assert set(det["box_source"]) == {"detector"} and sorted(det["image_id"]) == ["p:i1", "p:i2", "p:i3"]
    with pytest.raises(PipelineError, match="needs the detect stage"):
        crop.run(crop.CropConfig(**common, out=tmp_path / "none", box_source="detector"))


def test_select_all_includes_images_with_validated_boxes_but_ground_truth_still_wins(project, tmp_path):
    _, results, _ = run_detect(project, tmp_path / "all", select="all")
    assert set(by_id(results)) == set(PROJECT)
    box = by_id(results)["p:i4"]["detections"][0]["bbox"]  # the white box, not the validated one
    assert box == pytest.approx([400 / 640, 300 / 480, 80 / 640, 80 / 480], abs=0.01)
    common = dict(images=project["images"], ground_truth=project["ground_truth"], crop_size=32, workers=1)
    crop.run(crop.CropConfig(**common, detections=tmp_path / "all", out=tmp_path / "crops"))
    crops = tables.read_table(tmp_path / "crops" / "crops.csv", tables.CROPS).set_index("image_id")
    assert crops.loc["p:i4", "box_source"] == "ground_truth"
    problems = read_json(tmp_path / "crops" / "report.json")["problems"]
    assert not any("p-i4" in p["where"] for p in problems)


def test_fixed_shape_model_and_half_precision_give_the_same_boxes(project, detected, tmp_path):
    fixed = tiny_detector.export(tmp_path / "fixed.onnx", fixed=(1, SIZE, SIZE))
    _, square, _ = run_detect(project, tmp_path / "fixed", weights=str(fixed))
    _, half, _ = run_detect(project, tmp_path / "half", precision="fp16")
    ref = by_id(detected[1])
    for other in (by_id(square), by_id(half)):
        for iid in EXPECTED:
            assert other[iid]["detections"][0]["bbox"] == pytest.approx(ref[iid]["detections"][0]["bbox"], abs=0.01)
    assert half["info"]["detection_settings"]["precision"] == "fp16"
    order = list(EXPECTED)
    diff = detector.compare_detections(
        [ref[i]["detections"] for i in order], [by_id(half)[i]["detections"] for i in order], 0.2
    )
    assert diff["compared"] == 6 and diff["unmatched"] == 0 and diff["max_conf_diff"] <= detect.FP16_MAX_CONF_DIFF


def test_without_weights_the_stage_is_skipped_and_crop_uses_ground_truth(project, tmp_path):
    result, results, report = run_detect(project, tmp_path / "skip", weights="")
    assert result.skipped and results["images"] == [] and "no detector weights" in report["skipped"]
    validate(tmp_path / "skip" / layout.DETECTIONS_FILE)
    crop.run(
        crop.CropConfig(
            images=project["images"],
            ground_truth=project["ground_truth"],
            detections=tmp_path / "skip",
            out=tmp_path / "crops",
            crop_size=32,
            workers=1,
        )
    )
    assert set(tables.read_table(tmp_path / "crops" / "crops.csv", tables.CROPS)["box_source"]) == {"ground_truth"}


def without_time(results: dict) -> dict:
    return {**results, "info": {k: v for k, v in results["info"].items() if k != "detection_completion_time"}}


def test_the_stand_in_writes_what_detect_writes_without_weights(project, tmp_path):
    """On backends that skip detect without weights (pipelines/backends.py), a CPU step writes its results file."""
    _, results, _ = run_detect(project, tmp_path / "skip", weights="")
    result = detect.skipped(detect.SkippedConfig(out=tmp_path / "stand-in"))
    assert result.skipped and result.images == 0
    written = mdformat.read_results(tmp_path / "stand-in" / layout.DETECTIONS_FILE)
    assert without_time(written) == without_time(results)
    validate(tmp_path / "stand-in" / layout.DETECTIONS_FILE)
    assert "no detector weights" in read_json(tmp_path / "stand-in" / "report.json")["skipped"]


@pytest.mark.pipeline
def test_the_stand_in_component_runs_as_a_kfp_task(tmp_path):
    """Its component body, run by kfp.local as a container would run it, writes the results file crop reads."""
    import kfp.local
    from animl_retrain.components.detect import detect_skipped_op

    root = tmp_path / "root"
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    task = detect_skipped_op()
    out = Path(task.outputs["detections"].path)
    assert mdformat.read_results(out / layout.DETECTIONS_FILE)["images"] == []
    assert task.outputs["detections"].metadata["skipped"] is True


def test_anchor_free_layout_is_refused_with_a_clear_message(tmp_path):
    import torch

    class AnchorFree(torch.nn.Module):  # YOLOv8-style: [batch, 4 + classes, boxes], no objectness
        def forward(self, x):
            return x.mean(1, keepdim=True).flatten(2).expand(-1, 7, -1)

    path = tiny_detector.export(tmp_path / "v8.onnx", fixed=(1, 64, 64), module=AnchorFree())
    with pytest.raises(PipelineError, match="anchor-free"):
        detector.Detector(path, "cpu")  # the shape is in the file: refused on load
    path = tiny_detector.export(tmp_path / "v8-dynamic.onnx", module=AnchorFree())
    engine = detector.Detector(path, "cpu")  # the number of rows per box is symbolic: checked on the first batch
    with pytest.raises(PipelineError, match="anchor-free"):
        engine(np.zeros((1, 64, 64, 3), dtype=np.uint8))


def test_pytorch_checkpoints_and_non_onnx_files_are_refused(project, tmp_path):
    with pytest.raises(PipelineError, match="convert it to ONNX"):
        run_detect(project, tmp_path / "pt", weights=str(tmp_path / "md_v5a.0.0.pt"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="not an ONNX model"):
        run_detect(project, tmp_path / "junk", weights=str(tmp_path / "junk.onnx"))


# --- checkpointing --------------------------------------------------------------------------------------------


@pytest.fixture
def many_images(tmp_path):
    """300 small frames with a white box each, as the download and cct-to-md stages would leave them."""
    root = tmp_path / "many"
    rows = []
    for i in range(300):
        file = f"cam/img{i:04d}.jpg"
        path = root / "images" / layout.IMAGES_DIR / file
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (96, 72), (30, 30, 30))
        img.paste((255, 255, 255), (8 + i % 40, 8, 40 + i % 40, 40))
        img.save(path, quality=95)
        rows.append(
            {
                "image_id": f"p:{i}",
                "file": file,
                "key": file,
                "location": "a",
                "datetime": "",
                "width": 96,
                "height": 72,
                "n_objects": 1,
                "animl_labels": "fox",
                "needs_detection": True,
            }
        )
    import pandas as pd

    tables.write_table(pd.DataFrame(rows), root / "images" / "images.csv", tables.IMAGES)
    mdformat.write_results(root / "gt.json", mdformat.new_results("ground truth"))
    return root


def test_killed_run_resumes_without_redoing_finished_images(many_images, tmp_path):
    model = tiny_detector.export(tmp_path / "tiny.onnx")
    out = tmp_path / "killed"
    args = [
        sys.executable, "-m", "animl_retrain.cli", "detect", "--images", str(many_images / "images"),
        "--ground-truth", str(many_images / "gt.json"), "--out", str(out), "--weights", str(model),
        "--image-size", "64", "--batch-size", "1", "--checkpoint-every", "1", "--workers", "1", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = out / layout.DETECT_CHECKPOINT_DIR
    try:
        deadline = time.monotonic() + 120
        while len(list(shards.glob("shard-*.json"))) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the run and its decoding workers
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = sum(len(json.loads(p.read_text())) for p in shards.glob("shard-*.json"))
    assert 5 <= done_before < 300 and not (out / layout.DETECTIONS_FILE).exists()

    cfg = dict(
        images=many_images / "images",
        ground_truth=many_images / "gt.json",
        weights=str(model),
        image_size=64,
        batch_size=4,
        workers=1,
        device="cpu",
    )
    resumed = detect.run(detect.DetectConfig(**cfg, out=out))
    assert resumed.resumed == done_before and resumed.processed == 300 - done_before and resumed.images == 300
    assert not shards.exists()  # cleared once the results file is written
    fresh = detect.run(detect.DetectConfig(**cfg, out=tmp_path / "fresh"))
    assert fresh.resumed == 0
    assert (
        read_json(out / layout.DETECTIONS_FILE)["images"]
        == read_json(tmp_path / "fresh" / layout.DETECTIONS_FILE)["images"]
    )


def test_checkpoint_from_other_settings_is_refused_and_kept(many_images, tmp_path):
    """A restart under other settings stops and names them; the shards stay for a run with the old settings."""
    model = tiny_detector.export(tmp_path / "tiny.onnx")
    ckpt = detect.Checkpoint(str(tmp_path / "ckpt"))
    assert ckpt.load({"model_sha256": "other"}) == {}
    ckpt.save([{"file": "cam/img0000.jpg", "detections": []}])
    cfg = detect.DetectConfig(
        images=many_images / "images",
        ground_truth=many_images / "gt.json",
        out=tmp_path / "out",
        weights=str(model),
        image_size=64,
        checkpoint=str(tmp_path / "ckpt"),
        device="cpu",
    )
    with pytest.raises(
        PipelineError, match=r"detect checkpoint at .*ckpt was made with other settings \(.*model_sha256: 'other' ->"
    ):
        detect.run(cfg)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["run.json", "shard-000000.json"]
    assert not (tmp_path / "out" / layout.DETECTIONS_FILE).exists()
    shutil.rmtree(tmp_path / "ckpt")  # what the message says to do when the old results are not wanted
    result = detect.run(cfg)
    assert result.resumed == 0 and result.processed == 300
    assert by_id_count(read_json(tmp_path / "out" / layout.DETECTIONS_FILE)) == 300


def by_id_count(results):
    return sum(1 for im in results["images"] if im["detections"])


def test_half_precision_is_kept_only_within_tolerance(project):
    model = project["model"]
    half = detector.Detector(model, "cpu", "fp16")
    full = detector.Detector(model, "cpu", "fp32")
    files = [project["images"] / layout.IMAGES_DIR / _file(i) for i in ("p:i1", "p:i5")]
    batch = list(detector.decoded_images(files, 640, None, 0, 10**8))
    cfg = detect.DetectConfig(images=project["images"], ground_truth=project["ground_truth"], out=project["root"])
    found = detect._run_batch(half, batch, cfg.min_conf, None)
    engine, info = detect._check_half_precision(half, full, batch, found, cfg, None, {"precision": "fp16"})
    assert engine is half and info["fp16_check"]["kept_fp16"] and info["precision"] == "fp16"
    drifted = [[{**d, "conf": round(d["conf"] - 0.05, 3)} for d in dets] for dets in found]
    engine, info = detect._check_half_precision(half, full, batch, drifted, cfg, None, {"precision": "fp16"})
    assert engine is full and info["precision"] == "fp32" and info["fp16_check"]["max_conf_diff"] == pytest.approx(0.05)


@pytest.mark.server
def test_weights_and_checkpoint_on_s3_resume_a_run(project, s3, bucket, tmp_path):
    s3.upload_file(str(project["model"]), bucket, "models/tiny.onnx")
    cfg = dict(
        images=project["images"],
        ground_truth=project["ground_truth"],
        weights=f"s3://{bucket}/models/tiny.onnx",
        image_size=SIZE,
        device="cpu",
        checkpoint=f"s3://{bucket}/checkpoints",
        run_id="run-1",
    )
    # A run that was killed after finishing one image, whose (hand-made) entry must be taken, not redone.
    ckpt = detect.Checkpoint(f"s3://{bucket}/checkpoints/run-1")
    ckpt.load(detect.checkpoint_settings(project["model"], detect.DetectConfig(**cfg, out=tmp_path)))
    ckpt.save([{"file": _file("p:i1"), "detections": []}])
    result = detect.run(detect.DetectConfig(**cfg, out=tmp_path / "out"))
    assert result.resumed == 1 and result.processed == 5
    results = by_id(read_json(tmp_path / "out" / layout.DETECTIONS_FILE))
    assert results["p:i1"]["detections"] == [] and len(results["p:i2"]["detections"]) == 3
    assert s3.list_objects_v2(Bucket=bucket, Prefix="checkpoints/").get("KeyCount") == 0  # cleared when done


@pytest.mark.gpu
def test_on_a_gpu_half_precision_is_checked_and_boxes_stay_put(project, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    _, results, report = run_detect(project, tmp_path / "gpu", device="cuda", batch_size=4)
    assert report["provider"] == "CUDAExecutionProvider" and report["fp16_check"]["kept_fp16"]
    images = by_id(results)
    for iid, expected in EXPECTED.items():
        assert images[iid]["detections"][0]["bbox"] == pytest.approx(expected, abs=0.01)
