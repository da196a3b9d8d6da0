import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
from bench.stages.split import plain_search

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.core.report import Report
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


# --- the optimised search ----------------------------------------------------------------------------------------


def few_locations_rows(classes=20, per_class=5, seed=0):
    """Missouri-shaped: every class at exactly ``per_class`` locations, one class per location, uneven sizes."""
    rng = np.random.default_rng(seed)
    return [
        (f"species{c:02d}", f"seq{c:02d}-{k}")
        for c in range(classes)
        for k in range(per_class)
        for _ in range(int(rng.integers(3, 40)))
    ]


def test_the_optimised_split_places_every_class_where_random_search_cannot(tmp_path):
    src = write_crops(tmp_path, few_locations_rows())
    settings = {"crops": src, "val_frac": 0.2, "test_frac": 0.2, "seed": 4}
    ours = split.run(split.SplitConfig(out=tmp_path / "ours", **settings))
    theirs = split.run(split.SplitConfig(out=tmp_path / "random", method="random", trials=10_000, **settings))
    assert ours.missing == [] and ours.score == pytest.approx(ours.distance) and ours.score < 5
    assert len(theirs.missing) >= 2 and theirs.score > 2000  # 10,000 draws leave classes out of val or test
    table = tables.read_table(tmp_path / "ours" / "split.csv", tables.SPLIT)
    assert (table.groupby("label")["split"].nunique() == 3).all()
    assert (table.groupby("location")["split"].nunique() == 1).all() and table["group"].equals(table["location"])

    report = read_json(tmp_path / "random" / "report.json")
    assert report["method"] == "random" and report["trials"] == 10_000
    assert len(report["missing"]) == len(theirs.missing)
    assert report["distance"] == pytest.approx(report["score"] - split.MISSING_PENALTY * len(theirs.missing))
    m = report["missing"][0]
    assert m["groups"] == 5 and "no assignment found" in m["reason"]
    assert sum(p["what"] == "class missing from a split" for p in report["problems"]) == len(theirs.missing)


def test_per_class_shares_in_the_report_and_the_summary(tmp_path):
    src = write_crops(tmp_path, few_locations_rows(classes=4))
    result = split.run(split.SplitConfig(crops=src, out=tmp_path / "s", val_frac=0.2, test_frac=0.2))
    report = read_json(tmp_path / "s" / "report.json")
    assert report["targets"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert report["grouping"] == {"by": "location", "why": "20 locations", "groups": 20}
    for label, row in report["per_class"].items():
        assert sum(row[s]["crops"] for s in split.SPLITS) == sum(result.counts[s][label] for s in split.SPLITS)
        assert sum(row[s]["groups"] for s in split.SPLITS) == 5
        assert sum(row[s]["share"] for s in split.SPLITS) == pytest.approx(1, abs=1e-3)
        assert all(row[s]["crops"] == result.counts[s][label] for s in split.SPLITS)
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "Grouped by location" in summary and f"score {result.score:.3f}" in summary
    assert summary.count("| species0") == 4 and "test (target 0.20)" in summary


def test_the_optimised_search_is_deterministic_per_seed_and_scores_what_it_returns():
    counts, _, _ = split.class_location_counts(crops_table(random_rows(n_locations=60, n_classes=8, seed=2)))
    a, score_a = split.optimise(counts, 0.15, 0.15, seed=9)
    b, score_b = split.optimise(counts, 0.15, 0.15, seed=9)
    assert np.array_equal(a, b) and score_a == score_b
    assert score_a == pytest.approx(split.score_assignments(a[None], counts, 0.15, 0.15)[0])
    random_best = split.search(counts, split.SplitConfig(crops=".", out=".", trials=10_000, seed=9))[1]
    assert score_a <= random_best


def best_neighbour(counts, assign, allowed, swaps=True):
    """The best score one move (or one swap) reaches from ``assign``, each scored alone with score_assignments."""
    neighbours = []
    for g in range(len(assign)):
        for s in np.flatnonzero(allowed[g] & (np.arange(3) != assign[g])):
            neighbours.append(assign.copy())
            neighbours[-1][g] = s
        for h in range(g + 1, len(assign)) if swaps else ():
            if assign[g] != assign[h] and allowed[g, assign[h]] and allowed[h, assign[g]]:
                neighbours.append(assign.copy())
                neighbours[-1][[g, h]] = assign[[h, g]]
    return split.score_assignments(np.array(neighbours), counts, 0.15, 0.15).min()


def local_search_case():
    counts, _, _ = split.class_location_counts(crops_table(random_rows(n_locations=24, n_classes=5, seed=3)))
    start = split.draw_assignments(np.random.default_rng(0), 1, len(counts), 0.15, 0.15)[0]
    return counts, start, np.ones((len(counts), 3), bool), split.split_targets(0.15, 0.15)


def test_the_local_search_ends_where_no_move_or_swap_improves():
    counts, start, allowed, target = local_search_case()
    done = split.improve(counts, start, target, allowed, np.random.default_rng(0))
    score = split.score_assignments(done[None], counts, 0.15, 0.15)[0]
    assert score < split.score_assignments(start[None], counts, 0.15, 0.15)[0]
    assert best_neighbour(counts, done, allowed) >= score - 1e-9


def test_large_problems_swap_with_sampled_partners_that_share_a_class(monkeypatch):
    """Above EXHAUSTIVE_SWAP_PAIRS pairs, each round draws seeded partners: still no improving move is left."""
    counts, start, allowed, target = local_search_case()
    assert split._share_pairs(counts > 0) is not None
    monkeypatch.setattr(split, "EXHAUSTIVE_SWAP_PAIRS", 0)
    assert split._share_pairs(counts > 0) is None
    a, b = split._sampled_pairs(split._Problem(counts, target, allowed), np.random.default_rng(1))
    assert a.size == split.SWAP_PARTNERS * len(counts) and ((counts[a] > 0) & (counts[b] > 0)).any(axis=1).all()
    done = split.improve(counts, start, target, allowed, np.random.default_rng(0))
    assert np.array_equal(done, split.improve(counts, start, target, allowed, np.random.default_rng(0)))
    score = split.score_assignments(done[None], counts, 0.15, 0.15)[0]
    assert best_neighbour(counts, done, allowed, swaps=False) >= score - 1e-9


def test_a_frozen_test_set_holds_under_the_optimised_search_and_says_what_it_cannot_place(tmp_path):
    rows = few_locations_rows(classes=6)
    frozen = tmp_path / "frozen.json"
    # species00..04 have a frozen test location, species05 has none
    frozen.write_text(json.dumps({"format": split.FROZEN_FORMAT, "locations": [f"seq{c:02d}-0" for c in range(5)]}))
    result = split.run(
        split.SplitConfig(crops=write_crops(tmp_path, rows), out=tmp_path / "s", frozen_test_uri=str(frozen))
    )
    table = tables.read_table(tmp_path / "s" / "split.csv", tables.SPLIT)
    assert set(table[table["split"] == "test"]["location"]) == {f"seq{c:02d}-0" for c in range(5)}
    assert result.frozen_test == "reused" and result.missing == ["species05 in test"]
    [m] = read_json(tmp_path / "s" / "report.json")["missing"]
    assert m["reason"] == "the frozen test groups hold none"
    assert set(table[table["label"] == "species05"]["split"]) == {"train", "val"}  # still in train and val


# --- sequence grouping -------------------------------------------------------------------------------------------


def sequence_crops(images):
    """A crops table from (image_id, camera, datetime, label) rows, one crop each, all at location 'unknown'."""
    frame = crops_table([(label, "unknown") for _, _, _, label in images])
    frame["image_id"] = [i for i, _, _, _ in images]
    frame["camera"] = [c for _, c, _, _ in images]
    frame["datetime"] = [t for _, _, t, _ in images]
    return frame


def test_sequences_break_at_the_gap_and_at_a_camera_change():
    report = Report("split")
    crops = sequence_crops(
        [
            ("i1", "camA", "2024-03-01T06:00:00.000-08:00", "fox"),
            ("i2", "camA", "2024-03-01T06:00:50.000-08:00", "fox"),  # 50 s after i1: same burst
            ("i3", "camA", "2024-03-01T06:01:40.000-08:00", "fox"),  # 50 s after i2 (100 s after i1): chained
            ("i4", "camA", "2024-03-01T06:03:00.000-08:00", "fox"),  # 80 s after i3: a new burst
            ("i5", "camB", "2024-03-01T06:00:10.000-08:00", "fox"),  # same minute, another camera
        ]
    )
    groups = split.sequence_groups(crops, 60.0, report)
    assert groups.tolist() == [
        "camA@2024-03-01T14:00:00Z",
        "camA@2024-03-01T14:00:00Z",
        "camA@2024-03-01T14:00:00Z",
        "camA@2024-03-01T14:03:00Z",
        "camB@2024-03-01T14:00:10Z",
    ]
    assert report.problems == []
    assert split.sequence_groups(crops, 30.0, report).nunique() == 5


def test_sequences_compare_instants_across_offsets_and_isolate_images_without_a_datetime():
    report = Report("split")
    crops = sequence_crops(
        [
            ("i1", "camA", "2024-03-01T06:00:00-08:00", "rat"),
            ("i2", "camA", "2024-03-01T14:00:30Z", "rat"),  # 30 s later, written in UTC
            ("i3", "camA", "2024-03-01T15:00:55+01:00", "rat"),  # 25 s after that, written at +01:00
            ("i4", "camA", "", "rat"),
            ("i5", "camA", "yesterday", "rat"),
            ("i6", "", "2024-03-01T06:00:00-08:00", "rat"),  # no camera: grouped by its location's images
        ]
    )
    groups = split.sequence_groups(crops, 60.0, report).tolist()
    assert groups[:3] == ["camA@2024-03-01T14:00:00Z"] * 3
    assert groups[3:5] == ["camA@image:i4", "camA@image:i5"]
    assert groups[5] == "location:unknown@2024-03-01T14:00:00Z"
    problems = {p["what"]: p for p in report.problems}
    undated = problems["no usable datetime"]
    assert undated["where"] == "camA" and "2 image(s)" in undated["detail"]
    assert problems["no camera"]["where"] == "1 image(s)"


def bursts_rows(n_cameras=4, bursts=6, frames=3):
    """Images of one unknown location: per camera, bursts 10 minutes apart of frames 5 s apart, one label each."""
    images = []
    for cam in range(n_cameras):
        for b in range(bursts):
            label = ("fox", "rat", "deer_mouse")[(cam + b) % 3]
            for f in range(frames):
                when = dt.datetime(2024, 3, 1, 6, tzinfo=dt.UTC) + dt.timedelta(minutes=10 * b, seconds=5 * f)
                images.append((f"c{cam}b{b}f{f}", f"cam{cam}", when.isoformat(), label))
    return images


@pytest.mark.parametrize(("locations", "why"), [(["unknown"], "no image has a location"), (["Site A"], "one location")])
def test_auto_groups_by_sequence_without_usable_locations(tmp_path, locations, why):
    crops = sequence_crops(bursts_rows())
    crops["location"] = locations[0]
    (tmp_path / "crops").mkdir()
    tables.write_table(crops, tmp_path / "crops" / "crops.csv", tables.CROPS)
    result = split.run(split.SplitConfig(crops=tmp_path / "crops", out=tmp_path / "s", min_locs=3))
    report = read_json(tmp_path / "s" / "report.json")
    assert result.group_by == "sequence" and why in report["grouping"]["why"]
    assert report["grouping"]["groups"] == 24 and report["grouping"]["sequence_gap_seconds"] == 60.0
    table = tables.read_table(tmp_path / "s" / "split.csv", tables.SPLIT)
    assert (table.groupby("group")["split"].nunique() == 1).all()  # bursts stay whole
    assert table.groupby("group").size().eq(3).all() and result.missing == []
    assert "Grouped by sequence" in (tmp_path / "s" / "summary.md").read_text()


def test_group_by_is_the_users_choice_and_a_frozen_set_keeps_its_grouping(tmp_path):
    crops = sequence_crops(bursts_rows())
    crops["location"] = crops["camera"]  # four usable locations: auto would group by location
    (tmp_path / "crops").mkdir()
    tables.write_table(crops, tmp_path / "crops" / "crops.csv", tables.CROPS)
    frozen = tmp_path / "frozen.json"
    settings = {"crops": tmp_path / "crops", "frozen_test_uri": str(frozen)}
    first = split.run(split.SplitConfig(out=tmp_path / "a", group_by="sequence", **settings))
    assert first.group_by == "sequence" and read_json(frozen)["group_by"] == "sequence"
    assert read_json(tmp_path / "a" / "report.json")["grouping"]["why"] == "group_by: sequence"
    with pytest.raises(PipelineError, match="--group-by sequence"):
        split.run(split.SplitConfig(out=tmp_path / "b", **settings))  # auto: by location now
    again = split.run(split.SplitConfig(out=tmp_path / "c", group_by="sequence", seed=7, **settings))
    assert again.frozen_test == "reused" and again.test_fingerprint == first.test_fingerprint
