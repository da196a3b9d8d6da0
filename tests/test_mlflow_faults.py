"""MLflow faults: the tracking server down at the start of training or dying during it, and concurrent registrations.

Each test runs against real servers on loopback; the faulty MLflow server is a second one of our own (its own
SQLite database, the session's S3 for artifacts), killed with SIGKILL by its recorded PID and restarted on the
same port and database.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json, write_json
from animl_retrain.formats import layout
from animl_retrain.integrations.mlflow import registry
from animl_retrain.stages import evaluate, register, train
from animl_retrain.tools import services

pytestmark = pytest.mark.server
TINY = {"arch": "mobilenet_v3_small", "image_size": 32, "batch_size": 8, "workers": 0}
# MLflow's client retries a failed request 7 times with exponential backoff (minutes); the tests want seconds.
FAST_FAILING_CLIENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class OwnMlflow:
    """A second MLflow server that a test may kill and restart (same port, same database)."""

    def __init__(self, servers, state):
        self.state = state
        self.svc = dataclasses.replace(servers, mlflow_port=services._free_port())
        self.uri = self.svc.mlflow_uri

    def start(self):
        services._start_mlflow(self.svc, self.state)

    def kill(self):
        pid = services._alive(self.state, "mlflow")
        assert pid is not None, "the MLflow server to kill is not running"
        os.killpg(pid, signal.SIGKILL)  # dies, no clean shutdown
        services._stop_one(self.state, "mlflow", timeout=5)  # reaps it and removes its PID file

    def stop(self):
        services._stop_one(self.state, "mlflow", timeout=5)


@pytest.fixture
def own_mlflow(servers, tmp_path, monkeypatch):
    server = OwnMlflow(servers, tmp_path / "own-mlflow")
    try:
        server.start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        yield server
    finally:
        server.stop()


def register_champion(name: str) -> str:
    """A registered model with a champion version to watch (its contents do not matter here)."""
    import mlflow

    client = mlflow.MlflowClient()
    mlflow.set_experiment("faults-champion")
    with mlflow.start_run() as run:
        mlflow.log_dict({"stand-in": True}, "model/stand-in.json")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    return str(version.version)


def test_training_does_not_start_when_mlflow_is_down(stage_outputs, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{services._free_port()}")
    cfg = train.TrainConfig(crops=stage_outputs["crops"], split=stage_outputs["split"], out=tmp_path / "m", **TINY)
    with pytest.raises(PipelineError, match=r"MLflow tracking server http://127\.0\.0\.1:\d+ does not answer /health"):
        train.run(cfg)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_mlflow_dying_mid_training_fails_clearly_and_a_retry_resumes(own_mlflow, stage_outputs, s3, bucket, tmp_path):
    import mlflow

    champion = register_champion("faults-model")
    flags = {**TINY, "epochs": 5, "patience": 10, "checkpoint_every_steps": 2, "experiment": "faults"}
    flags |= {"checkpoint_uri": f"s3://{bucket}/ck"}
    cmd = [sys.executable, "-m", "animl_retrain.cli", "train", "--out", str(tmp_path / "model")]
    cmd += ["--crops", str(stage_outputs["crops"]), "--split", str(stage_outputs["split"])]
    cmd += [arg for k, v in flags.items() for arg in ("--" + k.replace("_", "-"), str(v))]
    cmd += ["--no-log-system-metrics"]
    env = {**os.environ, **FAST_FAILING_CLIENT, "MLFLOW_TRACKING_URI": own_mlflow.uri}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            obj = s3.list_objects_v2(Bucket=bucket, Prefix="ck/progress.json").get("Contents")
            progress = json.loads(s3.get_object(Bucket=bucket, Key="ck/progress.json")["Body"].read()) if obj else {}
            if progress.get("epoch", 0) >= 2:  # epoch 1 is logged; the server dies during epoch 2
                own_mlflow.kill()
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"training never reached epoch 2 (exit status {proc.poll()})")
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    assert proc.returncode != 0
    assert "error: train: the MLflow tracking server http://127.0.0.1" in stderr
    assert "no model was written and nothing was registered" in stderr and "a retry resumes from it" in stderr
    assert not (tmp_path / "model" / layout.MODEL_FILE).exists()  # nothing for evaluate/register to pick up

    own_mlflow.start()  # back, with the same database
    assert registry.champion("faults-model").version == champion
    retry = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr[-3000:]
    result = json.loads(retry.stdout[retry.stdout.index("{\n") :])
    # it resumes where the checkpoint is: the epoch the server died in, or the next if that one's metrics went out
    assert re.fullmatch(r"epoch [2-6] step \d+", result["resumed_from"]), result["resumed_from"]
    run_id = read_json(tmp_path / "model" / layout.MLFLOW_RUN_FILE)["run_id"]
    assert result["mlflow_run_id"] == run_id  # the run the first attempt started, not a second one
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    for metric in ("train_loss", "val_macro_f1"):  # every epoch's metrics, none lost with the server
        assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == list(range(1, 6))
    assert registry.champion("faults-model").version == champion  # training never touches the registry


@pytest.fixture(scope="module")
def model_and_evaluations(servers, stage_outputs, tmp_path_factory):
    """One trained model and two evaluations of it on the same test set, the second scoring lower macro-F1."""
    root = tmp_path_factory.mktemp("race")
    train.run(
        train.TrainConfig(
            crops=stage_outputs["crops"],
            split=stage_outputs["split"],
            out=root / "model",
            epochs=1,
            experiment="faults-race",
            **TINY,
        )
    )
    good = root / "good"
    evaluate.run(
        evaluate.EvaluateConfig(
            model=root / "model",
            crops=stage_outputs["crops"],
            split=stage_outputs["split"],
            export=stage_outputs["export"],
            out=good,
            registered_name="faults-race-none",
        )
    )
    worse = root / "worse"
    shutil.copytree(good, worse)
    metrics = read_json(worse / layout.METRICS_FILE)
    f1 = metrics["model"]["macro_f1"]
    assert f1 > 0, "the tiny model learned nothing: no worse evaluation to make"
    metrics["model"]["macro_f1"] = f1 - 0.1 if f1 >= 0.1 else f1 / 2
    write_json(worse / layout.METRICS_FILE, metrics)
    return root / "model", good, worse


def register_command(model, evaluation, export, out, name):
    cmd = [sys.executable, "-m", "animl_retrain.cli", "register", "--model", str(model), "--evaluation"]
    return [*cmd, str(evaluation), "--export", str(export), "--out", str(out), "--name", name]


@pytest.mark.parametrize("round_", [1, 2])
def test_concurrent_registrations_leave_champion_on_the_better_model(
    model_and_evaluations, stage_outputs, tmp_path, round_
):
    import mlflow

    model, good, worse = model_and_evaluations
    name = f"faults-race-{round_}"
    # round 1 starts the better one first, round 2 the worse one: the order must not matter
    order = [("good", good), ("worse", worse)] if round_ == 1 else [("worse", worse), ("good", good)]
    procs = {
        label: subprocess.Popen(
            register_command(model, evaluation, stage_outputs["export"], tmp_path / label, name),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label, evaluation in order
    }
    outputs = {}
    try:
        for label, proc in procs.items():
            outputs[label] = proc.communicate(timeout=240)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    for label, proc in procs.items():
        assert proc.returncode == 0, outputs[label][1][-3000:]

    client = mlflow.MlflowClient()
    versions = {label: read_json(tmp_path / label / "registration.json")["version"] for label in procs}
    assert sorted(v.version for v in client.search_model_versions(f"name='{name}'")) == sorted(versions.values())
    assert registry.champion(name).version == versions["good"]
    assert client.get_model_version_by_alias(name, "challenger").version in versions.values()
    winners = [label for label in procs if read_json(tmp_path / label / "registration.json")["promoted"]]
    assert winners == ["good"]


def test_a_lost_race_is_settled_to_the_better_model(model_and_evaluations, stage_outputs, tmp_path):
    """The interleaving the concurrent test may not hit: the worse model moved the alias last."""
    import mlflow

    model, good, worse = model_and_evaluations
    name = "faults-race-settle"
    client = mlflow.MlflowClient()
    cfg = {"model": model, "export": stage_outputs["export"], "name": name}
    better = register.run(register.RegisterConfig(evaluation=good, out=tmp_path / "good", **cfg))
    assert better.promoted
    # The worse run read "no champion" before the better one registered, promoted itself and wrote the alias last:
    loser = register.run(register.RegisterConfig(evaluation=worse, out=tmp_path / "worse", **cfg))
    assert not loser.promoted  # run alone, it compares with the champion and loses
    client.set_model_version_tag(name, loser.version, registry.COMPARED_TAG, "none")
    client.set_model_version_tag(name, loser.version, registry.DECISION_TAG, "promoted")
    client.set_registered_model_alias(name, "champion", loser.version)

    assert registry.settle(name, loser.version, pause=0.05) == better.version
    assert client.get_model_version_by_alias(name, "champion").version == better.version

    # A champion that left the race group (a person picked another version) is left alone.
    client.set_model_version_tag(name, loser.version, registry.COMPARED_TAG, "7")
    client.set_registered_model_alias(name, "champion", loser.version)
    assert registry.settle(name, better.version, pause=0.05) == loser.version
    assert client.get_model_version_by_alias(name, "champion").version == loser.version


@pytest.mark.parametrize("name", ["it's", 'say "x"', "back\\slash"])
def test_a_model_name_that_would_break_registry_filters_is_refused(name, tmp_path):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="name"):
        register.RegisterConfig(model=tmp_path, evaluation=tmp_path, export=tmp_path, out=tmp_path, name=name)
