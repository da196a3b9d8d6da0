"""The compiled pipeline as Kubernetes will see it: GPUs, resources, secrets, retries, caching, exit handler."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from animl_retrain.pipelines import k8s
from animl_retrain.pipelines.retrain import COMPILED
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from animl_retrain.formats import layout

STAGE_TASKS = {
    "export-op": "export",
    "download-op": "download",
    "cct-to-md-op": "cct-to-md",
    "detect-op": "detect",
    "crop-op": "crop",
    "split-op": "split",
    "train-op": "train",
    "evaluate-op": "evaluate",
    "register-op": "register",
    "deploy-op": "deploy",
}
# Tasks that are sub-DAGs, not containers: the exit handler's body, the incremental-mode and the deploy condition.
DAG_TASKS = {"exit-handler-1", "condition-2", "condition-3"}
COMPILE_ENV = ("IMAGE_REGISTRY", "IMAGE_TAG", "GPU_NODE_SELECTOR", "GPU_TOLERATION")


def compile_with(tmp_path, **env) -> list[dict]:
    """Compile in a fresh interpreter (the settings are read at import) and load both YAML documents."""
    out = tmp_path / "p.yaml"
    base = {k: v for k, v in os.environ.items() if k not in COMPILE_ENV}
    subprocess.run(
        [sys.executable, "-m", "animl_retrain.cli", "compile", "--output", str(out)],
        env=base | env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return list(yaml.safe_load_all(out.read_text()))


@pytest.fixture(scope="module")
def docs():
    return list(yaml.safe_load_all(COMPILED.read_text()))


@pytest.fixture(scope="module")
def spec(docs):
    return json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())


@pytest.fixture(scope="module")
def k8s_config(docs) -> dict[str, kubernetes_executor_config_pb2.KubernetesExecutorConfig]:
    """The kfp-kubernetes settings of every executor, parsed strictly into kfp-kubernetes' protobuf type."""
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    return {
        name: json_format.ParseDict(
            json_format.MessageToDict(struct), kubernetes_executor_config_pb2.KubernetesExecutorConfig()
        )
        for name, struct in executors.items()
    }


def tasks(spec) -> dict:
    """Every task of the pipeline, whichever DAG it sits in, by task name."""
    out = dict(spec.root.dag.tasks)
    for component in spec.components.values():
        out.update(component.dag.tasks)
    return out


def container(spec, task):
    executor = spec.components[task.component_ref.name].executor_label
    return json_format.MessageToDict(spec.deployment_spec["executors"][executor]["container"]), executor


def test_two_documents_that_parse_into_kfp_types(docs, spec, k8s_config):
    assert len(docs) == 2
    assert set(tasks(spec)) == set(STAGE_TASKS) | DAG_TASKS | {"record-status-op"}
    assert set(k8s_config) == {f"exec-{t}" for t in STAGE_TASKS} | {"exec-record-status-op"}


def test_only_detection_and_training_ask_for_a_gpu_node(spec, k8s_config):
    for name, task in tasks(spec).items():
        if name in DAG_TASKS:
            continue
        resources = container(spec, task)[0]["resources"]
        config = k8s_config[container(spec, task)[1]]
        if name in ("train-op", "detect-op"):
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == (
                "{{$.inputs.parameters['pipelinechannel--train_gpus']}}" if name == "train-op" else "1"
            )
            assert [(t.key, t.operator, t.effect) for t in config.tolerations] == [
                ("nvidia.com/gpu", "Exists", "NoSchedule")
            ]
            assert dict(config.node_selector.labels) == {"nvidia.com/gpu.present": "true"}
            [shm] = config.empty_dir_mounts
            assert (shm.mount_path, shm.medium, shm.size_limit) == ("/dev/shm", "Memory", k8s.SHM_SIZE)
        else:
            assert "accelerator" not in resources, name
            assert not config.tolerations and not config.node_selector.labels and not config.empty_dir_mounts, name
    assert spec.root.input_definitions.parameters["train_gpus"].default_value.string_value == "1"


def test_every_task_has_cpu_and_memory_requests_and_limits(spec, k8s_config):
    for name, task in tasks(spec).items():
        if name in DAG_TASKS:
            continue
        task_container, executor = container(spec, task)
        resources = task_container["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources.get(key), (name, key)
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"], name
        assert k8s_config[executor].security_context.run_as_non_root, name


def test_secrets_come_from_kubernetes_secrets_by_name_only(tmp_path):
    sentinels = {
        "AWS_ACCESS_KEY_ID": "AKIASENTINELKEYID000",
        "AWS_SECRET_ACCESS_KEY": "sentinel-secret-access-key",
        "MLFLOW_TRACKING_URI": "http://user:sentinel-password@mlflow.example:5000",
        "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-password",
    }
    docs = compile_with(tmp_path, **sentinels)
    text = json.dumps(docs)
    for value in sentinels.values():
        assert value not in text
    assert "sentinel" not in text
    for name in docs[0]["root"]["inputDefinitions"]["parameters"]:
        assert not any(word in name.lower() for word in ("password", "secret", "token", "credential", "access_key"))

    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secret_names = {s["secretName"] for e in executors.values() for s in e.get("secretAsEnv", [])}
    assert secret_names == {k8s.S3_SECRET, k8s.MLFLOW_SECRET, k8s.ANIML_SECRET, k8s.AWS_DEPLOY_SECRET}
    env_by_executor = {
        name: {m["envVar"]: s["secretName"] for s in e.get("secretAsEnv", []) for m in s["keyToEnv"]}
        for name, e in executors.items()
    }
    assert env_by_executor["exec-export-op"] == {k: k8s.S3_SECRET for k in k8s.S3_KEYS} | {
        k: k8s.MLFLOW_SECRET for k in (k8s.MLFLOW_URI_KEY, *k8s.MLFLOW_AUTH_KEYS)
    } | {v: k8s.ANIML_SECRET for v in k8s.ANIML_KEYS.values()}
    assert env_by_executor["exec-split-op"] == {}
    for name in ("exec-train-op", "exec-evaluate-op", "exec-register-op", "exec-record-status-op"):
        assert env_by_executor[name]["MLFLOW_TRACKING_URI"] == k8s.MLFLOW_SECRET, name
    # Deploy's AWS keys under their own names: AWS_ACCESS_KEY_ID would outrank IRSA for the launcher too.
    deploy_env = env_by_executor["exec-deploy-op"]
    assert {k for k, v in deploy_env.items() if v == k8s.AWS_DEPLOY_SECRET} == set(k8s.AWS_DEPLOY_KEYS)
    assert all(k.startswith("ANIML_DEPLOY_AWS_") for k in k8s.AWS_DEPLOY_KEYS) and "AWS_ACCESS_KEY_ID" not in deploy_env
    # No executor sets a credential as a plain environment variable either.
    for executor in docs[0]["deploymentSpec"]["executors"].values():
        assert not executor["container"].get("env"), executor


def test_network_stages_and_training_retry_with_backoff(spec):
    retried = {}
    for name, task in tasks(spec).items():
        if task.HasField("retry_policy"):
            retried[name] = task.retry_policy
    assert set(retried) == {"export-op", "download-op", "detect-op", "train-op", "register-op"}
    for policy in retried.values():
        assert policy.max_retry_count >= 2
        assert policy.backoff_duration.seconds >= 10 and policy.backoff_factor > 1
        assert policy.backoff_max_duration.seconds >= policy.backoff_duration.seconds


def test_caching_is_off_where_a_cached_result_would_be_wrong(spec):
    cached = {name: task.caching_options.enable_cache for name, task in tasks(spec).items() if name not in DAG_TASKS}
    assert {n for n, on in cached.items() if not on} == {
        "export-op",
        "train-op",
        "evaluate-op",
        "register-op",
        "deploy-op",
        "record-status-op",
    }


def test_exit_handler_runs_after_every_stage_whatever_happened(spec):
    root = spec.root.dag.tasks
    exit_task = root["record-status-op"]
    assert (
        exit_task.trigger_policy.strategy
        == pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.ALL_UPSTREAM_TASKS_COMPLETED
    )
    assert list(exit_task.dependent_tasks) == ["exit-handler-1"]
    assert exit_task.inputs.parameters["status"].task_final_status.producer_task == "exit-handler-1"
    body = dict(spec.components[root["exit-handler-1"].component_ref.name].dag.tasks)
    body.update(spec.components[body["condition-2"].component_ref.name].dag.tasks)  # everything after export
    body.update(spec.components[body["condition-3"].component_ref.name].dag.tasks)  # deploy, when asked for
    assert set(body) == set(STAGE_TASKS) | {"condition-2", "condition-3"}


def test_display_names_match_the_stage_names(spec):
    for name, task in tasks(spec).items():
        if name in STAGE_TASKS:
            assert task.task_info.name == STAGE_TASKS[name]


def test_gpu_node_pool_is_configurable_at_compile_time(tmp_path):
    docs = compile_with(tmp_path, GPU_NODE_SELECTOR="cloud.google.com/gke-accelerator=nvidia-l4", GPU_TOLERATION="")
    train = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-op"]
    assert train["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert "tolerations" not in train
    docs = compile_with(tmp_path, GPU_NODE_SELECTOR="", IMAGE_REGISTRY="registry.example/animl", IMAGE_TAG="t1")
    train = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-op"]
    assert "nodeSelector" not in train and train["tolerations"][0]["key"] == "nvidia.com/gpu"
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/animl/animl-retrain-cpu:t1", "registry.example/animl/animl-retrain-ml:t1"}


def test_a_malformed_node_selector_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPU_NODE_SELECTOR", "no-equals-sign")
    with pytest.raises(ValueError, match="GPU_NODE_SELECTOR='no-equals-sign': expected key=value"):
        k8s.gpu_node_selector()


def test_light_stages_run_on_the_cpu_image_and_torch_stages_on_the_ml_image(spec):
    cpu_stages = {"export-op", "download-op", "cct-to-md-op", "crop-op", "split-op"}
    for name, task in tasks(spec).items():
        if name in DAG_TASKS:
            continue
        image = container(spec, task)[0]["image"]
        assert image.rsplit("/", 1)[1].startswith("animl-retrain-cpu" if name in cpu_stages else "animl-retrain-ml")


@pytest.mark.pipeline
def test_a_failed_run_still_records_its_status_locally(small_demo, tmp_path, monkeypatch):
    """kfp.local runs the exit handler after a failing stage; the run still fails, with a clear error."""
    from animl_retrain.core.errors import PipelineError
    from animl_retrain.tools.local_run import run_local

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {
        "export_uri": small_demo.export_uri,
        "images_uri": small_demo.images_uri,
        "label_spec": small_demo.label_spec_uri,
        "min_locs": 1000,  # no class is seen at that many locations: the split stage fails
        "split_trials": 10,
    }
    with pytest.raises(PipelineError, match="the pipeline failed"):
        run_local(params, tmp_path)
    [status_file] = tmp_path.rglob(f"record-status-op/run_status/{layout.STATUS_FILE}")
    status = json.loads(status_file.read_text())
    assert status["state"] == "FAILED"
    assert status["kfp_run_id"]
    assert status["mlflow"] == "not recorded: MLFLOW_TRACKING_URI is not set"
    assert not list(tmp_path.rglob("train-op/model/*"))


def test_every_dag_declares_the_inputs_its_tasks_read(spec):
    """A parameter used inside the exit handler's DAG must be passed into it (kfp drops one used only in resources)."""
    for name, component in [("root", spec.root), *spec.components.items()]:
        declared = set(component.input_definitions.parameters)
        for task_name, task in component.dag.tasks.items():
            for param, value in task.inputs.parameters.items():
                if value.HasField("component_input_parameter"):
                    assert value.component_input_parameter in declared, (name, task_name, param)
            for expr in [v.runtime_value.constant.string_value for v in task.inputs.parameters.values()]:
                for ref in re.findall(r"inputs\.parameters\['([^']+)'\]", expr):
                    assert ref in task.inputs.parameters, (name, task_name, ref)
