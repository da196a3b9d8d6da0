"""The benchmark harness itself (the benchmarks run with `make bench`, never in tests)."""

import json

from bench import harness, run


def test_ratio_says_how_many_times_better_ours_is():
    faster = harness.Row("s", "images/s", "images/s", 30.0, "alt", 10.0, "in")
    quicker = harness.Row("s", "time", "s", 2.0, "alt", 10.0, "in", higher_is_better=False)
    nothing_to_compare = harness.Row("s", "time", "s", 2.0, "—", None, "in")
    assert (faster.ratio, quicker.ratio, nothing_to_compare.ratio) == (3.0, 5.0, None)
    assert set(faster.to_json()) == {
        "stage",
        "metric",
        "unit",
        "ours",
        "alternative",
        "alternative_value",
        "ratio",
        "input",
        "machine",
        "load",
        "noisy",
    }


def test_measure_runs_setup_before_every_call_and_takes_medians():
    calls = []
    timing = harness.measure(lambda: calls.append("fn"), repeats=3, warmup=1, setup=lambda: calls.append("setup"))
    assert calls == ["setup", "fn"] * 4
    assert timing.wall >= 0 and timing.cpu >= 0
    order = []
    harness.measure_pair(lambda: order.append("ours"), lambda: order.append("theirs"), repeats=2, warmup=0)
    assert order == ["ours", "theirs", "ours", "theirs"]


def test_results_merge_by_stage_and_are_written_as_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    mach = {"cores": 2, "cpu": "test cpu", "gpu": "no GPU"}
    old = [
        harness.Row("a", "m", "u", 1.0, "alt", 2.0, "in", machine=mach),
        harness.Row("b", "m", "u", 1.0, "alt", 2.0, "in"),
    ]
    harness.write_results(old, ["a", "b"], mach)
    latest, table = harness.write_results([harness.Row("b", "m2", "u", 4.0, "alt", 2.0, "in")], ["b"], mach)
    rows = json.loads(latest.read_text())
    assert [(r["stage"], r["metric"]) for r in rows] == [("a", "m"), ("b", "m2")]
    assert "| b | m2 | 4 u | alt | 2 u | 2.00× | not recorded | in |" in table.read_text()
    assert "no GPU" in table.read_text()


def test_every_stage_module_is_found_by_name():
    assert {"download", "crop", "split", "train_data", "pipeline"} <= set(run.available())
