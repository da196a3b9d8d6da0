import numpy as np
import pandas as pd
import pytest
from bench.stages.split import plain_search

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.formats import tables
from animl_retrain.stages import split


def crops_table(rows) -> pd.DataFrame:
    base = {c: "" for c in tables.CROPS}
    frame = pd.DataFrame(
        [
            {**base, "annotation_id": f"a{i}", "crop": f"c{i}.jpg", "label": label, "location": loc}
            for i, (label, loc) in enumerate(rows)
        ]
    )
    for c in ("x", "y", "w", "h", "conf"):
        frame[c] = 0.0
    return frame


def write_crops(tmp_path, rows):
    (tmp_path / "crops").mkdir()
    tables.write_table(crops_table(rows), tmp_path / "crops" / "crops.csv", tables.CROPS)
    return tmp_path / "crops"


def random_rows(n_locations=40, n_classes=6, seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    for loc in range(n_locations):
        for c in rng.choice(n_classes, size=rng.integers(2, n_classes + 1), replace=False):
            rows += [(f"class{c}", f"loc{loc}")] * int(rng.integers(1, 30))
    return rows


def test_vectorised_search_equals_the_plain_loop(tmp_path):
    crops = crops_table(random_rows())
    counts, _, _ = split.class_location_counts(crops)
    cfg = split.SplitConfig(crops=tmp_path, out=tmp_path, trials=600, seed=7)
    fast, fast_score = split.search(counts, cfg)
    slow, slow_score = plain_search(counts, cfg)
    assert np.array_equal(fast, slow) and fast_score == pytest.approx(slow_score)


def test_locations_stay_whole_and_the_seed_decides(tmp_path):
    src = write_crops(tmp_path, random_rows())
    a = split.run(split.SplitConfig(crops=src, out=tmp_path / "a", seed=3, trials=2000))
    b = split.run(split.SplitConfig(crops=src, out=tmp_path / "b", seed=3, trials=2000))
    table = tables.read_table(tmp_path / "a" / "split.csv", tables.SPLIT)
    assert (table.groupby("location")["split"].nunique() == 1).all()
    assert a.test_fingerprint == b.test_fingerprint
    assert (tmp_path / "a" / "split.csv").read_text() == (tmp_path / "b" / "split.csv").read_text()
    # every class lands in every split, near the requested shares
    for label in a.labels:
        total = sum(a.counts[s][label] for s in split.SPLITS)
        assert a.counts["test"][label] > 0 and a.counts["val"][label] > 0
        assert abs(a.counts["test"][label] / total - 0.15) < 0.12
    assert read_json(tmp_path / "a" / "label_index.json") == {str(i): label for i, label in enumerate(a.labels)}


def test_rare_classes_are_dropped_with_a_message(tmp_path):
    rows = [*random_rows(n_classes=3), ("rare", "loc0"), ("rare", "loc1")]
    src = write_crops(tmp_path, rows)
    result = split.run(split.SplitConfig(crops=src, out=tmp_path / "s", min_locs=3, trials=200))
    assert "rare" not in result.labels
    problem = read_json(tmp_path / "s" / "report.json")["problems"][0]
    assert problem["where"] == "rare" and "2 location" in problem["detail"]


def test_bad_settings_and_too_few_locations(tmp_path):
    with pytest.raises(PipelineError, match="val_frac"):
        split.SplitConfig.build(crops=tmp_path, out=tmp_path, val_frac=0.6, test_frac=0.5)
    src = write_crops(tmp_path, [("a", "l1"), ("b", "l1"), ("a", "l2"), ("b", "l2")])
    with pytest.raises(PipelineError, match="cannot fill train, val and test"):
        split.run(split.SplitConfig(crops=src, out=tmp_path / "s", min_locs=1, trials=10))


def test_frozen_test_set_is_written_then_reused_and_new_locations_go_to_train_or_val(tmp_path):
    frozen = tmp_path / "frozen" / "test_locations.json"
    first = split.run(
        split.SplitConfig(
            crops=write_crops(tmp_path, random_rows()), out=tmp_path / "a", trials=500, frozen_test_uri=str(frozen)
        )
    )
    assert first.frozen_test == "written"
    test_locs = set(read_json(frozen)["locations"])
    a = tables.read_table(tmp_path / "a" / "split.csv", tables.SPLIT)
    assert test_locs == set(a[a["split"] == "test"]["location"])

    # a later export: more locations, another seed; the test set stays exactly the same
    later = tmp_path / "later"
    later.mkdir()
    rows = random_rows() + [(label, f"new{loc}") for label, loc in random_rows(n_locations=15, seed=9)]
    second = split.run(
        split.SplitConfig(
            crops=write_crops(later, rows), out=tmp_path / "b", trials=500, seed=5, frozen_test_uri=str(frozen)
        )
    )
    b = tables.read_table(tmp_path / "b" / "split.csv", tables.SPLIT)
    assert second.frozen_test == "reused" and second.test_fingerprint == first.test_fingerprint
    assert set(b[b["split"] == "test"]["location"]) == test_locs
    assert not b[b["location"].str.startswith("new")]["split"].eq("test").any()
    assert set(b[b["location"].str.startswith("new")]["split"]) == {"train", "val"}

    # override: a new test set, written over the old one
    third = split.run(
        split.SplitConfig(
            crops=later / "crops",
            out=tmp_path / "c",
            trials=500,
            seed=5,
            frozen_test_uri=str(frozen),
            new_test_set=True,
        )
    )
    assert third.frozen_test == "written" and set(read_json(frozen)["locations"]) != test_locs


def test_frozen_test_set_problems_are_reported(tmp_path):
    frozen = tmp_path / "frozen.json"
    frozen.write_text('{"format": "animl-retrain-test-locations/1", "locations": ["loc0", "loc1", "gone"]}')
    src = write_crops(tmp_path, random_rows())
    result = split.run(split.SplitConfig(crops=src, out=tmp_path / "s", trials=100, frozen_test_uri=str(frozen)))
    assert result.locations["test"] == 2
    problems = read_json(tmp_path / "s" / "report.json")["problems"]
    assert any(p["what"] == "frozen test locations absent" and "gone" in p["detail"] for p in problems)
    frozen.write_text('{"format": "animl-retrain-test-locations/1", "locations": ["elsewhere"]}')
    with pytest.raises(PipelineError, match="new-test-set"):
        split.run(split.SplitConfig(crops=src, out=tmp_path / "t", trials=100, frozen_test_uri=str(frozen)))
    frozen.write_text("[1, 2]")
    with pytest.raises(PipelineError, match="unreadable"):
        split.run(split.SplitConfig(crops=src, out=tmp_path / "u", trials=100, frozen_test_uri=str(frozen)))
