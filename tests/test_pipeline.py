import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from animl_retrain.pipelines.retrain import COMPILED, compile_pipeline
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from animl_retrain.core import storage
from animl_retrain.tools import demo, services
from animl_retrain.tools.local_run import format_summary, run_local
from tests.fake_animl import Cognito, FakeAniml

STAGES = ["export", "download", "cct-to-md", "detect", "crop", "split", "train", "evaluate", "register"]


def all_tasks(spec) -> set[str]:
    """Task names of the root DAG and of every sub-DAG (conditions, exit handlers)."""
    names = set(spec.root.dag.tasks)
    for component in spec.components.values():
        names |= set(component.dag.tasks)
    return names


def test_compiles_to_kfp_ir(tmp_path):
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    assert {f"{s}-op" for s in STAGES} <= all_tasks(spec)
    deploy = spec.components["comp-condition-3"].dag.tasks["deploy-op"]
    assert not deploy.caching_options.enable_cache  # a deployment must never be skipped as "cached"
    assert "deploy" in spec.components["comp-condition-2"].dag.tasks["condition-3"].trigger_policy.condition
    assert set(spec.root.input_definitions.parameters) >= {"export_uri", "images_uri", "label_spec", "model_name"}
    for name, executor in spec.deployment_spec["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, name


def test_committed_yaml_matches_the_code(tmp_path):
    compile_env = ("IMAGE_REGISTRY", "IMAGE_TAG", "GPU_NODE_SELECTOR", "GPU_TOLERATION")
    env = {k: v for k, v in os.environ.items() if k not in compile_env}
    out = tmp_path / "fresh.yaml"
    subprocess.run(
        [sys.executable, "-m", "animl_retrain.cli", "compile", "--output", str(out)],
        env=env,
        check=True,
        capture_output=True,
    )
    assert out.read_text() == COMPILED.read_text(), "pipelines/retrain.yaml is stale: run `make compile`"


@pytest.mark.server
@pytest.mark.pipeline
def test_whole_pipeline_locally_then_load_the_champion(servers, tmp_path, monkeypatch, capfd):
    from animl_retrain.core.storage import s3_client
    from tests.serving_support import moto_server

    client = s3_client()
    for b in ("it-images", "it-exports"):
        client.create_bucket(Bucket=b)
    demo.generate(
        "s3://it-images",
        "s3://it-exports/export.json",
        "s3://it-exports/spec.json",
        n_images=120,
        n_locations=8,
        seed=5,
    )
    # Initial weights where the README recommends EfficientNet-Lite0's: inside a site-packages folder, a path
    # kfp.local would rewrite ('python3' -> the interpreter's path) but for tools/local_run.protect_parameters.
    weights = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "tiny_weights" / "mobilenet.pth"
    weights.parent.mkdir(parents=True)
    import torch
    import torchvision

    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), weights)
    params = {
        "export_uri": "s3://it-exports/export.json",
        "images_uri": "s3://it-images",
        "label_spec": "s3://it-exports/spec.json",
        "model_name": "it-model",
        "experiment": "it",
        "arch": "mobilenet_v3_small",
        "weights": str(weights),
        "image_size": 32,
        "epochs": 2,
        "batch_size": 16,
        "split_trials": 500,
        "min_locs": 2,
        "deploy": True,
        "deploy_dry_run": True,
    }
    with moto_server() as aws:  # the deploy step's dry run reads SageMaker and SSM: moto, never AWS
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", aws)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", aws)
        summary = run_local(params, tmp_path / "root")

    assert list(summary["stages"]) == [*STAGES, "deploy"]
    deploy = summary["stages"]["deploy"]
    assert deploy["dry_run"] and deploy["version"] == "1" and deploy["problem_counts"] == {}
    assert summary["stages"]["register"]["promoted"] is True
    text = format_summary(summary, servers.mlflow_uri)
    assert "it-model version 1" in text and servers.mlflow_uri in text and "macro-F1" in text
    assert "Split by location: " in text and "(optimise search)" in text
    [link] = (tmp_path / "root" / "inputs").iterdir()
    assert link.resolve() == weights.resolve() and "python3" not in str(link)

    [status_file] = (tmp_path / "root").rglob("record-status-op/run_status/status.json")
    status = json.loads(status_file.read_text())
    assert status["state"] == "SUCCEEDED" and len(status["mlflow_runs"]) == 1, status

    crop = next((tmp_path / "root").rglob("crops/crops/fox/*.jpg"))
    code = f"""
import json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/it-model@champion")
out = model.predict(pd.DataFrame({{"image": [open({str(crop)!r}, "rb").read()]}}))
print(json.dumps(out.iloc[0].to_dict()))
"""
    env = {**os.environ, **services.client_env(servers)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(probs) == {"bird", "deer_mouse", "fox", "lizard", "rat", "skunk"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)

    # A scheduled run pulls the same labels from Animl itself; incremental mode sees nothing new and skips training.
    cognito = Cognito().start()
    try:
        cognito.add_user("bot@example.org", "Pipeline-pass-1!", ["animl/it_project/project_member"])
        exported = json.loads(storage.read_bytes("s3://it-exports/export.json"))
        animl = FakeAniml(cognito.url, cognito.pool_id, [cognito.client_id], {"it_project": exported}).start()
        try:
            env = cognito.env(ANIML_USERNAME="bot@example.org", ANIML_PASSWORD="Pipeline-pass-1!")
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            scheduled = {
                **params,
                "export_uri": "animl-api",
                "animl_api_url": animl.api_url,
                "animl_project": "it_project",
                "animl_client_id": cognito.client_id,
                "animl_user_pool_id": cognito.pool_id,
                "export_archive": "s3://it-exports/archive",
                "incremental": True,
            }
            second = run_local(scheduled, tmp_path / "root")
        finally:
            animl.stop()
    finally:
        cognito.stop()
    assert list(second["stages"]) == ["export"]
    report = second["stages"]["export"]
    assert report["decision"] == "skip" and "since the export behind champion v1" in report["decision_reason"]
    assert report["archive_uri"].startswith("s3://it-exports/archive/it_project/")
    artifact = Path(second["run_dir"]) / "export-op" / "export" / "export.json"
    assert storage.read_bytes(report["archive_uri"]) == artifact.read_bytes()
    assert "Training skipped: no new validated annotations" in format_summary(second)

    # Credentials never leak: not in any output or log, any file a stage wrote, the compiled pipeline, or MLflow.
    secrets_used = {"S3 secret key": servers.secret_key, "Animl password": "Pipeline-pass-1!"}
    logs = capfd.readouterr()
    assert "record-status-op" in logs.out + logs.err  # the runs' logs were captured
    assert f"tensors from {link}" in logs.out + logs.err  # train loaded the weights through the link
    haystacks = {"stdout": logs.out, "stderr": logs.err, "compiled pipeline": COMPILED.read_text()}
    haystacks |= {str(p): p.read_bytes().decode("latin-1") for p in (tmp_path / "root").rglob("*") if p.is_file()}
    haystacks |= {f"MLflow: {where}": text for where, text in mlflow_texts()}
    assert len(haystacks) > 50
    for what, secret in secrets_used.items():
        leaks = [where for where, text in haystacks.items() if secret in text]
        assert not leaks, f"the {what} appears in {leaks}"


def mlflow_texts():
    """Every param and tag of every run, and every tag of every registered model version, as (where, text)."""
    import mlflow

    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=1000):
        yield f"run {run.info.run_id} params", json.dumps(run.data.params)
        yield f"run {run.info.run_id} tags", json.dumps(run.data.tags)
    for model in client.search_registered_models():
        yield f"model {model.name} tags", json.dumps(model.tags)
        for version in client.search_model_versions(f"name='{model.name}'"):
            yield f"{model.name} v{version.version} tags", json.dumps(version.tags)
