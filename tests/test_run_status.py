"""The exit handler's record against a real MLflow server: tags, dangling runs closed, never a crash."""

import json

import pytest

from animl_retrain.formats import layout
from animl_retrain.stages import status as run_status


def status_file(out) -> dict:
    return json.loads((out / layout.STATUS_FILE).read_text())


@pytest.mark.server
def test_a_failed_run_tags_its_mlflow_runs_and_closes_the_dangling_one(servers, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("status-failed")
    finished = client.create_run(experiment_id, tags={"kfp_run_id": "kfp-1"})
    client.set_terminated(finished.info.run_id, "FINISHED")
    dangling = client.create_run(experiment_id, tags={"kfp_run_id": "kfp-1"})  # its pod was killed: still RUNNING
    other = client.create_run(experiment_id, tags={"kfp_run_id": "kfp-2"})

    cfg = run_status.StatusConfig(
        state="FAILED", kfp_run_id="kfp-1", experiment="status-failed", error_message="train failed", out=tmp_path
    )
    result = run_status.run(cfg)

    assert set(result.mlflow_runs) == {finished.info.run_id, dangling.info.run_id}
    assert result.marked_failed == [dangling.info.run_id]
    assert client.get_run(dangling.info.run_id).info.status == "FAILED"
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"
    assert client.get_run(finished.info.run_id).data.tags["kfp_status"] == "FAILED"
    assert "kfp_status" not in client.get_run(other.info.run_id).data.tags
    recorded = status_file(tmp_path)
    assert recorded["state"] == "FAILED" and recorded["error_message"] == "train failed"
    assert json.loads((tmp_path / "report.json").read_text())["counts"] == {"mlflow_runs": 2, "marked_failed": 1}


@pytest.mark.server
def test_a_successful_run_is_tagged_and_left_as_it_is(servers, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("status-ok")
    run = client.create_run(experiment_id, tags={"kfp_run_id": "kfp-9"})
    result = run_status.run(
        run_status.StatusConfig(state="SUCCEEDED", kfp_run_id="kfp-9", experiment="status-ok", out=tmp_path)
    )
    assert result.marked_failed == [] and client.get_run(run.info.run_id).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).data.tags["kfp_status"] == "SUCCEEDED"
    # An experiment that was never created (the run failed before training) is not an error.
    result = run_status.run(
        run_status.StatusConfig(state="FAILED", kfp_run_id="kfp-9", experiment="never-created", out=tmp_path)
    )
    assert result.mlflow_runs == [] and result.mlflow == "tagged 0 run(s) in experiment 'never-created'"


def test_an_unreachable_tracking_server_is_recorded_not_raised(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:pw@127.0.0.1:{port}")
    result = run_status.run(run_status.StatusConfig(state="FAILED", kfp_run_id="kfp-3", out=tmp_path))
    assert result.mlflow.startswith("not recorded: MLflow tracking server http://***@127.0.0.1")
    recorded = status_file(tmp_path)
    assert recorded["state"] == "FAILED" and "pw" not in json.dumps(recorded)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problem_counts"] == {"mlflow": 1} and "pw" not in json.dumps(report)
