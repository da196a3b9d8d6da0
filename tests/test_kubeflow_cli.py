"""``submit``, ``schedule`` and ``runs`` against a fake Kubeflow Pipelines API server on loopback.

The fake answers the v2beta1 REST calls the kfp SDK makes and records every request, so the tests check the
bodies the real ``kfp.Client`` sends (the uploaded pipeline, the run and the recurring run).
"""

import email.parser
import email.policy
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

API = "/apis/v2beta1"
PARAMS = {"export_uri": "s3://exports/e.json", "images_uri": "s3://images", "label_spec": "s3://exports/spec.json"}


class FakeKFP:
    """Just enough of the Kubeflow Pipelines API for the CLI, keeping every request it gets."""

    def __init__(self):
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = {
                    "method": self.command,
                    "path": url.path,
                    "query": dict(urllib.parse.parse_qsl(url.query)),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
                fake.requests.append(request)
                status, answer = fake.route(request)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, r):
        path, method = r["path"], r["method"]
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if path == f"{API}/pipelines" and method == "GET":
            name = json.loads(r["query"]["filter"])["predicates"][0]["stringValue"]
            found = [p for p in self.pipelines.values() if p["display_name"] == name]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if path == f"{API}/pipelines/upload":
            pid = f"p-{len(self.pipelines) + 1}"
            self.pipelines[pid] = {"pipeline_id": pid, "display_name": r["query"]["name"]}
            self.versions[pid] = [{"pipeline_id": pid, "pipeline_version_id": f"{pid}-v1"}]
            return 200, self.pipelines[pid]
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[-2]
            return 200, {"pipeline_versions": list(reversed(self.versions[pid]))}
        if path == f"{API}/pipelines/upload_version":
            pid = r["query"]["pipelineid"]
            version = {"pipeline_id": pid, "pipeline_version_id": f"{pid}-v{len(self.versions[pid]) + 1}"}
            self.versions[pid].append(version | {"display_name": r["query"]["name"]})
            return 200, version
        if path == f"{API}/experiments" and method == "GET":
            name = json.loads(r["query"]["filter"])["predicates"][0]["stringValue"]
            found = [e for e in self.experiments.values() if e["display_name"] == name]
            return 200, {"experiments": found} if found else {}
        if path == f"{API}/experiments" and method == "POST":
            body = json.loads(r["body"])
            eid = f"e-{len(self.experiments) + 1}"
            self.experiments[eid] = {"experiment_id": eid, "display_name": body["display_name"]}
            return 200, self.experiments[eid]
        if path == f"{API}/runs" and method == "POST":
            body = json.loads(r["body"])
            run = body | {"run_id": f"r-{len(self.runs) + 1}", "state": "PENDING", "created_at": "2026-11-20T03:00:00Z"}
            self.runs.append(run)
            return 200, run
        if path == f"{API}/runs" and method == "GET":
            eid = r["query"].get("experiment_id")
            runs = [x for x in reversed(self.runs) if eid is None or x["experiment_id"] == eid]
            return 200, {"runs": runs[: int(r["query"].get("page_size", 10))]}
        if path == f"{API}/recurringruns" and method == "POST":
            return 200, json.loads(r["body"]) | {"recurring_run_id": "rr-1", "status": "ENABLED"}
        return 404, {"error": f"the fake has no {method} {path}", "code": 5}

    def calls(self, method, path):
        return [r for r in self.requests if r["method"] == method and r["path"] == f"{API}{path}"]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def kfp_server():
    with FakeKFP() as fake:
        yield fake


@pytest.fixture
def cli_env(tmp_path):
    """A clean environment: our own HOME (the kfp client reads ~/.config/kfp), no compile-time overrides."""
    drop = ("IMAGE_REGISTRY", "IMAGE_TAG", "GPU_NODE_SELECTOR", "GPU_TOLERATION", "KF_PIPELINES_ENDPOINT", "KFP_TOKEN")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"HOME": str(tmp_path)}


def cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "animl_retrain.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def uploaded_spec(request) -> dict:
    """The pipeline YAML inside a multipart upload, as the SDK sent it."""
    head = f"Content-Type: {request['headers']['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + request["body"])
    [part] = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "uploadfile"]
    return list(yaml.safe_load_all(part.get_payload(decode=True)))


def param_args(params=PARAMS):
    return [a for k, v in params.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.timeout(120)
def test_submit_uploads_a_version_and_starts_a_run(kfp_server, cli_env, tmp_path):
    env = cli_env | {"IMAGE_REGISTRY": "registry.example/animl", "IMAGE_TAG": "2024.06", "KFP_TOKEN": "tok-123"}
    proc = cli(env, "submit", "--host", kfp_server.url, *param_args(), "--set", "epochs=3", "--run-name", "first")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"run r-1: {kfp_server.url}/#/runs/details/r-1"

    [upload] = kfp_server.calls("POST", "/pipelines/upload")
    assert upload["query"]["name"] == "animl-classifier-retraining"
    docs = uploaded_spec(upload)
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {
        "registry.example/animl/animl-retrain-cpu:2024.06",
        "registry.example/animl/animl-retrain-ml:2024.06",
    }
    assert "train_gpus" in spec.root.input_definitions.parameters and len(docs) == 2

    [experiment] = kfp_server.calls("POST", "/experiments")
    assert json.loads(experiment["body"])["display_name"] == "animl-retrain"
    [run] = kfp_server.calls("POST", "/runs")
    body = json.loads(run["body"])
    assert body["display_name"] == "first" and body["experiment_id"] == "e-1"
    assert body["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "p-1-v1"}
    assert body["runtime_config"]["parameters"] == PARAMS | {"epochs": 3}
    assert body["service_account"] == "animl-retrain-pipeline"
    assert "pipeline_spec" not in body  # the run refers to the uploaded version
    assert all(r["headers"].get("authorization") == "Bearer tok-123" for r in kfp_server.requests)
    assert "tok-123" not in proc.stdout + proc.stderr

    # A second submission adds a version to the same pipeline and reuses the experiment.
    proc = cli(env, "submit", "--host", kfp_server.url, *param_args(), "--json", "--service-account", "")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["run_id"] == "r-2" and result["pipeline_version"] == "p-1-v2"
    [version] = kfp_server.calls("POST", "/pipelines/upload_version")
    assert version["query"]["pipelineid"] == "p-1" and version["query"]["name"].startswith("2024.06-")
    assert len(kfp_server.calls("POST", "/experiments")) == 1
    assert "service_account" not in json.loads(kfp_server.calls("POST", "/runs")[1]["body"])


@pytest.mark.timeout(120)
def test_submit_and_schedule_upload_the_variant_of_the_backend_named(kfp_server, cli_env):
    """Kubeflow 1.10 (KFP 2.5): no final-status input, no securityContext, no 'optional' in what is uploaded."""
    for command in ("submit", "schedule"):
        proc = cli(cli_env, command, "--host", kfp_server.url, *param_args(), "--kfp-backend", "2.5")
        assert proc.returncode == 0, proc.stderr
    uploads = kfp_server.calls("POST", "/pipelines/upload") + kfp_server.calls("POST", "/pipelines/upload_version")
    assert len(uploads) == 2
    for upload in uploads:
        text = json.dumps(uploaded_spec(upload))
        assert "taskFinalStatus" not in text and "securityContext" not in text and '"optional"' not in text
    proc = cli(cli_env, "submit", "--host", kfp_server.url, *param_args(), "--set", "train_gpus=1.5")
    assert proc.returncode == 2 and "train_gpus=1.5: expected a whole number of GPUs" in proc.stderr
    assert len(kfp_server.calls("POST", "/runs")) == 1  # the bad GPU count started nothing


def test_compile_names_the_backends_it_knows(cli_env, tmp_path):
    proc = cli(cli_env, "compile", "--kfp-backend", "2.8", "--output", str(tmp_path / "p.yaml"))
    assert proc.returncode == 2 and "no KFP backend releases 2.6 to 2.13" in proc.stderr
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.timeout(120)
def test_schedule_creates_a_weekly_recurring_run_without_catchup(kfp_server, cli_env):
    proc = cli(cli_env, "schedule", "--host", kfp_server.url, "--cron", "0 0 3 * * 0", *param_args())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"recurring run rr-1 (0 0 3 * * 0): {kfp_server.url}/#/recurringrun/details/rr-1"
    [job] = kfp_server.calls("POST", "/recurringruns")
    body = json.loads(job["body"])
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert body["no_catchup"] is True and int(body["max_concurrency"]) == 1 and body["mode"] == "ENABLE"
    assert body["display_name"] == "animl-retrain weekly"
    assert body["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "p-1-v1"}
    assert body["runtime_config"]["parameters"] == PARAMS


def test_a_five_field_cron_is_refused_with_the_fix(kfp_server, cli_env):
    proc = cli(cli_env, "schedule", "--host", kfp_server.url, "--cron", "0 3 * * 0", *param_args())
    assert proc.returncode == 2
    assert "Kubeflow's cron has 6, seconds first: try '0 0 3 * * 0'" in proc.stderr
    assert kfp_server.requests == []


@pytest.mark.timeout(120)
def test_parameters_are_checked_before_anything_is_uploaded(kfp_server, cli_env):
    proc = cli(cli_env, "submit", "--host", kfp_server.url, *param_args(), "--set", "epoch=3")
    assert proc.returncode == 2 and "unknown pipeline parameters ['epoch']" in proc.stderr
    proc = cli(cli_env, "submit", "--host", kfp_server.url, "--set", "images_uri=s3://images")
    assert proc.returncode == 2 and "missing pipeline parameters ['export_uri', 'label_spec']" in proc.stderr
    assert not kfp_server.calls("POST", "/pipelines/upload") and not kfp_server.calls("POST", "/runs")


@pytest.mark.timeout(120)
def test_runs_lists_recent_runs_with_their_state(kfp_server, cli_env):
    assert cli(cli_env, "submit", "--host", kfp_server.url, *param_args(), "--run-name", "weekly 1").returncode == 0
    kfp_server.runs[0]["state"] = "SUCCEEDED"
    proc = cli(cli_env, "runs", "--host", kfp_server.url)
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()
    assert header.split() == ["created", "state", "name", "run", "id"]
    assert row.split() == ["2026-11-20", "03:00", "SUCCEEDED", "weekly", "1", "r-1"]
    [listing] = kfp_server.calls("GET", "/runs")
    assert listing["query"]["experiment_id"] == "e-1" and listing["query"]["sort_by"] == "created_at desc"

    proc = cli(cli_env, "runs", "--host", kfp_server.url, "--experiment", "nope")
    assert proc.returncode == 2 and "No experiment is found with name nope" in proc.stderr


def test_without_a_host_the_error_says_how_to_give_one(cli_env):
    proc = cli(cli_env, "runs")
    assert proc.returncode == 2 and "give --host URL or set KF_PIPELINES_ENDPOINT" in proc.stderr
