import json

import pytest
from megadetector.postprocessing.validate_batch_results import ValidateBatchResultsOptions, validate_batch_results

from animl_retrain.core.io import read_json
from animl_retrain.formats import layout, mdformat
from animl_retrain.stages import cct_to_md, download, export
from tests.conftest import TEST_SPEC, jpeg_bytes, make_export


def validate(path):
    options = ValidateBatchResultsOptions()
    options.raise_errors = True
    options.check_image_existence = False
    result = validate_batch_results(str(path), options)["validation_results"]
    assert result["errors"] == [] and result["warnings"] == []


def test_demo_ground_truth_passes_megadetector_validator(stage_outputs):
    path = stage_outputs["ground_truth"] / layout.GROUND_TRUTH_FILE
    validate(path)
    data = read_json(path)
    assert data["info"]["format_version"] == "1.6"
    assert data["classification_categories"] == {
        "0": "bird",
        "1": "deer_mouse",
        "2": "fox",
        "3": "lizard",
        "4": "rat",
        "5": "skunk",
    }
    det = data["images"][0]["detections"][0]
    assert isinstance(det["conf"], float) and det["category"] == "1" and det["annotation_id"]


@pytest.fixture
def converted(tmp_path):
    """Run export, a local download and cct-to-md on a hand-made export; return the results file."""

    def run(data):
        (tmp_path / "export.json").write_text(json.dumps(data))
        for img in data["images"]:
            path = tmp_path / "bucket" / img["serving_bucket_key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes((64, 48)))
        export.run(export.ExportConfig(source=str(tmp_path / "export.json"), label_spec=TEST_SPEC, out=tmp_path / "e"))
        download.run(
            download.DownloadConfig(export=tmp_path / "e", images_uri=str(tmp_path / "bucket"), out=tmp_path / "i")
        )
        cct_to_md.run(cct_to_md.CctToMdConfig(export=tmp_path / "e", images=tmp_path / "i", out=tmp_path / "g"))
        return read_json(tmp_path / "g" / layout.GROUND_TRUTH_FILE), read_json(tmp_path / "g" / "report.json")

    return run


def test_boxes_are_normalised_with_or_without_size_in_export(converted):
    data = make_export()  # image p:aaa has width/height, p:bbb does not (read from its 64x48 header)
    results, _ = converted(data)
    boxes = {d["annotation_id"]: d["bbox"] for im in results["images"] for d in im["detections"]}
    assert boxes["a1"] == pytest.approx([10 / 64, 10 / 48, 20 / 64, 10 / 48], abs=1e-6)
    assert boxes["a2"] == pytest.approx([5 / 64, 5 / 48, 10 / 64, 10 / 48], abs=1e-6)
    labels = results["classification_categories"]
    cls = {d["annotation_id"]: labels[d["classifications"][0][0]] for im in results["images"] for d in im["detections"]}
    assert cls == {"a1": "fox", "a2": "rodent"}


def test_boxes_leaving_the_frame_are_clipped_or_reported(converted):
    data = make_export()
    data["annotations"][0]["bbox"] = [50, 40, 30, 30]  # partly outside a 64x48 frame
    data["annotations"][1]["bbox"] = [100, 100, 5, 5]  # wholly outside
    results, report = converted(data)
    assert results["images"][0]["detections"][0]["bbox"] == pytest.approx([50 / 64, 40 / 48, 14 / 64, 8 / 48], abs=1e-6)
    assert report["counts"]["clipped"] == 1 and report["counts"]["skipped"] == 1
    assert report["problems"][0]["what"] == "box outside the frame"


def test_normalise_box_rejects_nothing_inside():
    assert mdformat.normalise_box(10, 10, 10, 10, 100, 50) == ([0.1, 0.2, 0.1, 0.2], False)
    assert mdformat.normalise_box(-5, 0, 10, 10, 100, 50) == ([0.0, 0.0, 0.05, 0.2], True)
    assert mdformat.normalise_box(200, 0, 10, 10, 100, 50) is None
