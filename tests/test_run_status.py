"""The exit handler's record against a real MLflow server: tags, dangling runs closed, never a crash."""

import contextlib
import http.server
import json
import socket
import threading

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


@pytest.mark.parametrize(
    ("backend_state", "outcome"),
    [
        ("COMPLETE", "SUCCEEDED"),  # ML Metadata's name, what a cluster's driver passes (driver/resolve.go)
        ("CACHED", "SUCCEEDED"),
        ("RUNNING", "SUCCEEDED"),  # a block whose dsl.If branch was skipped
        ("SUCCEEDED", "SUCCEEDED"),  # kfp.local
        ("FAILED", "FAILED"),
        ("CANCELED", "CANCELED"),
        ("UNKNOWN", "UNKNOWN"),
        ("", "UNKNOWN"),
    ],
)
def test_backend_states_map_to_an_outcome(backend_state, outcome):
    assert run_status.outcome(backend_state) == outcome


def test_a_skipped_branch_is_recorded_as_success(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_status.run(run_status.StatusConfig(state="RUNNING", kfp_run_id="kfp-5", out=tmp_path))
    assert (result.state, result.backend_state) == ("SUCCEEDED", "RUNNING")
    assert status_file(tmp_path)["state"] == "SUCCEEDED"


@contextlib.contextmanager
def kfp_api(runs: dict[str, dict]):
    """A loopback HTTP server answering GET /apis/v2beta1/runs/{id} with the run as KFP's API shapes it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            run_id = self.path.rsplit("/", 1)[-1]
            body = json.dumps(runs[run_id]).encode() if run_id in runs else b'{"error": "not found"}'
            self.send_response(200 if run_id in runs else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_with_tasks(*states: tuple[str, str]) -> dict:
    tasks = [{"display_name": name, "state": state} for name, state in states]
    return {"run_id": "r", "state": "RUNNING", "run_details": {"task_details": tasks}}


def test_without_a_final_status_the_state_comes_from_the_kfp_api(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    runs = {
        "ok": run_with_tasks(("export", "SUCCEEDED"), ("deploy", "SKIPPED"), ("exit-handler-1", "RUNNING")),
        "bad": run_with_tasks(("export", "SUCCEEDED"), ("train", "FAILED"), ("status", "RUNNING")),
        "stopped": run_with_tasks(("train", "CANCELED")),
    }
    with kfp_api(runs) as url:
        monkeypatch.setenv("KFP_API_URL", url)
        for run_id, expected in (("ok", "SUCCEEDED"), ("bad", "FAILED"), ("stopped", "CANCELED")):
            out = tmp_path / run_id
            assert run_status.run(run_status.StatusConfig(kfp_run_id=run_id, out=out)).state == expected
        result = run_status.run(run_status.StatusConfig(kfp_run_id="gone", out=tmp_path / "gone"))
    assert result.state == "UNKNOWN"
    report = json.loads((tmp_path / "gone" / "report.json").read_text())
    assert report["problem_counts"]["kfp-api"] == 1 and "HTTP 404" in json.dumps(report)


def test_an_unreachable_kfp_api_is_recorded_not_raised(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KFP_API_URL", f"http://127.0.0.1:{port}")
    result = run_status.run(run_status.StatusConfig(kfp_run_id="kfp-7", out=tmp_path))
    assert result.state == "UNKNOWN" and status_file(tmp_path)["backend_state"] == "UNKNOWN"
