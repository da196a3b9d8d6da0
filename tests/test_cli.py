import json
import subprocess
import sys

import pytest

from animl_retrain.cli import STAGES, main
from tests.conftest import TEST_SPEC, make_export


def cli(*args):
    return subprocess.run([sys.executable, "-m", "animl_retrain.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["run", "compile", "submit", "schedule", "runs", "services", "demo", *STAGES])
def test_every_subcommand_has_help(command):
    proc = cli(command, "--help")
    assert proc.returncode == 0 and "usage: animl-retrain" in proc.stdout


def test_stage_subcommand_runs_and_reports(tmp_path, capsys):
    (tmp_path / "e.json").write_text(json.dumps(make_export()))
    assert (
        main(
            ["export", "--source", str(tmp_path / "e.json"), "--label-spec", TEST_SPEC, "--out", str(tmp_path / "out")]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["classes"] == {"fox": 1, "rodent": 1}


def test_errors_are_one_clear_line(tmp_path):
    (tmp_path / "e.json").write_text("{broken")
    proc = cli("export", "--source", str(tmp_path / "e.json"), "--label-spec", TEST_SPEC, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: export ")
    assert "Traceback" not in proc.stderr
    proc = cli("split", "--crops", str(tmp_path), "--out", str(tmp_path), "--val-frac", "1.5")
    assert proc.returncode == 2 and "--val-frac" in proc.stderr
