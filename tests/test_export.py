import json

import pytest

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.formats import tables
from animl_retrain.formats.labelspec import load_label_spec, parse_label_spec
from animl_retrain.stages import export
from tests.conftest import TEST_SPEC, make_export


def run_export(path, tmp_path, spec=TEST_SPEC, **kw):
    cfg = export.ExportConfig(source=path, label_spec=spec, out=tmp_path / "out", **kw)
    return export.run(cfg), tmp_path / "out"


def test_maps_labels_by_name_and_drops_empty(write_export, tmp_path):
    result, out = run_export(write_export(make_export()), tmp_path)
    objects = tables.read_table(out / "objects.csv", tables.OBJECTS)
    assert dict(zip(objects["annotation_id"], objects["label"], strict=True)) == {"a1": "fox", "a2": "rodent"}
    assert result.classes == {"fox": 1, "rodent": 1}
    report = read_json(out / "report.json")
    assert report["dropped"] == {"empty": 1}
    assert report["unused_categories"] == ["deer"]
    assert report["per_location"] == {"Site A": 1, "Site B": 1}
    assert (out / "export.json").read_bytes() == json.dumps(make_export()).encode()


def test_camera_and_datetime_reach_the_tables(write_export, tmp_path):
    """Animl's export has no camera field: the serial is the second part of file_name; datetime is kept as given."""
    _, out = run_export(write_export(make_export()), tmp_path)
    images = tables.read_table(out / "images.csv", tables.IMAGES).set_index("image_id")
    objects = tables.read_table(out / "objects.csv", tables.OBJECTS).set_index("annotation_id")
    assert images["camera"].to_dict() == {"p:aaa": "cam1", "p:bbb": "cam2"}
    assert (objects.loc["a1", "camera"], objects.loc["a1", "datetime"]) == ("cam1", "2024-01-01T00:00:00.000-08:00")
    assert (objects.loc["a2", "camera"], objects.loc["a2", "datetime"]) == ("cam2", "")


def test_tables_written_before_the_camera_column_still_read(tmp_path):
    """A table from an older run (or a cached stage output) lacks camera/datetime: they read as ''."""
    path = tmp_path / "objects.csv"
    columns = [c for c in tables.OBJECTS if c not in ("camera", "datetime")]
    path.write_text(",".join(columns) + "\n" + "a1,p:aaa,p/x.jpg,fox,Fox,1,2,3,4,True,Site A\n")
    table = tables.read_table(path, tables.OBJECTS)
    assert table.loc[0, "camera"] == "" and table.loc[0, "datetime"] == "" and table.loc[0, "location"] == "Site A"


def test_category_ids_can_change_between_exports(write_export, tmp_path):
    data = make_export()
    renumber = {0: 7, 1: 9, 2: 4, 3: 1}
    data["categories"] = [{"id": renumber[c["id"]], "name": c["name"]} for c in data["categories"]]
    for a in data["annotations"]:
        a["category_id"] = renumber[a["category_id"]]
    first, _ = run_export(write_export(make_export(), "a.json"), tmp_path / "a")
    second, _ = run_export(write_export(data, "b.json"), tmp_path / "b")
    assert first.classes == second.classes


def test_unmapped_labels_dropped_or_other(write_export, tmp_path):
    data = make_export()
    data["annotations"].append({"id": "a4", "image_id": "p:aaa", "category_id": 3, "bbox": [1, 1, 5, 5]})
    dropped, out = run_export(write_export(data), tmp_path / "d")
    assert "other" not in dropped.classes
    assert read_json(out / "report.json")["unmapped_labels"] == {"deer": 1}
    other, out = run_export(write_export(data), tmp_path / "o", unmapped="other")
    assert other.classes["other"] == 1
    assert "other" in read_json(out / "label_spec.json")


def test_only_validated(write_export, tmp_path):
    data = make_export()
    data["annotations"][0]["validated"] = False
    kept, out = run_export(write_export(data), tmp_path / "v")
    assert kept.classes == {"rodent": 1}
    assert read_json(out / "report.json")["dropped"]["not validated"] == 1
    everything, _ = run_export(write_export(data), tmp_path / "all", only_validated=False)
    assert everything.classes == {"fox": 1, "rodent": 1}


def test_unsafe_file_names_are_skipped_and_reported(write_export, tmp_path):
    data = make_export()
    data["images"][0]["file_name"] = "../../etc/passwd.jpg"
    result, out = run_export(write_export(data), tmp_path)
    assert result.classes == {"rodent": 1}
    report = read_json(out / "report.json")
    assert report["problem_counts"] == {"unsafe file_name": 1}
    assert report["dropped"]["image skipped"] == 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("images"), "'images' is missing"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 'p:aaa'"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id 'a1'"),
        (
            lambda d: d["annotations"][0].update(image_id="nope"),
            "annotations[0] (id 'a1'): image_id 'nope' is not in images",
        ),
        (lambda d: d["annotations"][1].update(category_id=99), "annotations[1] (id 'a2'): category_id 99"),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 5]), "negative or zero size"),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, -3, 5]), "negative or zero size"),
        (lambda d: d["annotations"][0].update(bbox=[1, "x", 3, 5]), "'bbox' must be"),
        (lambda d: d["images"][1].pop("serving_bucket_key"), "images[1] (id 'p:bbb'): needs 'serving_bucket_key'"),
        (lambda d: d["images"][0].update(width="wide"), "'width' must be a positive integer"),
        (lambda d: d["categories"].append({"id": 1, "name": "x"}), "duplicate category id 1"),
    ],
)
def test_structural_errors_name_field_and_record(write_export, tmp_path, mutate, message):
    data = make_export()
    mutate(data)
    with pytest.raises(PipelineError, match="structural error") as err:
        run_export(write_export(data), tmp_path)
    assert message in str(err.value)


def test_every_structural_error_is_listed(write_export, tmp_path):
    data = make_export()
    for a in data["annotations"]:
        a["image_id"] = "gone"
    with pytest.raises(PipelineError, match="3 structural error"):
        run_export(write_export(data), tmp_path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "top level must be a JSON object"),
        (b'{"a": "\x80"}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_broken_json(write_export, tmp_path, raw, message):
    with pytest.raises(PipelineError, match=message):
        run_export(write_export(raw), tmp_path)


def test_legacy_original_relative_path(write_export, tmp_path):
    data = make_export()
    for img in data["images"]:
        img["original_relative_path"] = "cam/" + img.pop("serving_bucket_key")
    _, out = run_export(write_export(data), tmp_path)
    images = tables.read_table(out / "images.csv", tables.IMAGES)
    assert images["key"].str.startswith("cam/original/").all()


def test_nothing_left_is_an_error(write_export, tmp_path):
    with pytest.raises(PipelineError, match="no annotation is left"):
        run_export(write_export(make_export()), tmp_path, spec=json.dumps({"bird": ["bird"]}))


def test_label_spec_forms_and_errors(tmp_path):
    spec = parse_label_spec(
        {"Fox": ["fox", "Island  Fox"], "rat": {"dataset_labels": {"animl": ["rat"]}, "invasive": True}}
    )
    assert spec.lookup()["island fox"] == "Fox"
    assert spec.invasive == {"rat"}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"a": ["x"]}))
    assert load_label_spec(str(path)).labels == ["a"]
    with pytest.raises(PipelineError, match="mapped to both"):
        parse_label_spec({"a": ["x"], "b": ["X "]})
    with pytest.raises(PipelineError, match="unknown keys"):
        parse_label_spec({"a": {"dataset_labels": {"animl": ["x"]}, "colour": "red"}})
    with pytest.raises(PipelineError, match="not valid JSON"):
        load_label_spec("{oops")
    with pytest.raises(PipelineError, match="file not found"):
        load_label_spec(str(tmp_path / "missing.json"))
