"""Every bench stage runs in ``--smoke`` mode (its --quick inputs, one timed run, our side only where the
alternative would need installing), so that a bench fixture cannot drift from a stage's schema unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench import run

ROOT = Path(__file__).resolve().parents[1]


# Whole-pipeline and model-export stages take minutes even with --smoke; their inputs are the CLI and
# examples/demo.yaml (pipeline) and exported models (serve, train), which their own tests cover. Run with -m slow.
HEAVY = {"pipeline", "serve", "train"}


@pytest.mark.parametrize(
    "stage", [pytest.param(s, marks=pytest.mark.slow) if s in HEAVY else s for s in sorted(run.available())]
)
def test_bench_stage_runs_in_smoke_mode(stage, tmp_path):
    results = ROOT / "bench" / "results" / "latest.json"
    before = results.read_bytes() if results.is_file() else None
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--stage", stage, "--work", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"bench stage {stage} failed in --smoke:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"| {stage} |" in proc.stdout or "skipped" in proc.stderr  # rows, or a stated skip (accuracy)
    assert (results.read_bytes() if results.is_file() else None) == before  # --smoke writes no results
    if f"| {stage} |" in proc.stdout:
        assert "| load |" in proc.stdout  # every row carries the load before and after


def test_rows_carry_the_load_and_are_marked_noisy_above_one_task_per_core():
    from bench import harness

    ctx = harness.Context(Path("."), 1, True, None, {"cores": 2}, smoke=True, load_before={"runnable": 3.0})
    row = ctx.row(stage="s", metric="m", unit="u", ours=1.0, alternative="a", alternative_value=1.0, input="i")
    assert row.noisy and row.load["before"]["runnable"] == 3.0 and "runnable" in row.load["after"]
    assert harness.is_noisy({"runnable": 1.5}, {"runnable": 2.0}, cores=2) is False
    assert harness.is_noisy({"runnable": None}, {}, cores=2) is None
    cell = harness._load_cell(json.loads(json.dumps(row.to_json())))
    assert "3.0 →" in cell and "**noisy**" in cell
