"""The compatibility matrix: each compiled variant against what that Kubeflow Pipelines backend accepts.

Every rule cites the kubeflow/pipelines source (release tag and file) it encodes; ``pipelines/backends.py``
holds the same facts for the compiler. The committed ``pipelines/retrain.yaml`` is the 2.16 variant.
"""

import pytest
import yaml
from animl_retrain.pipelines import backends, k8s
from animl_retrain.pipelines.retrain import COMPILED, compile_pipeline
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

# Fields of the task Kubernetes config each strict backend knows, read from
# kubernetes_platform/proto/kubernetes_executor_config.proto at the tag (2.14.0 and 2.15.0 parse strictly with
# protojson.Unmarshal in backend/src/v2/compiler/argocompiler/container.go; 2.16.0 adds security_context = 18).
COMMON_FIELDS = {
    "secretAsEnv", "secretAsVolume", "pvcMount", "nodeSelector", "podMetadata", "imagePullSecret",
    "imagePullPolicy", "configMapAsVolume", "configMapAsEnv", "activeDeadlineSeconds", "fieldPathAsEnv",
    "tolerations", "genericEphemeralVolume", "nodeAffinity", "podAffinity", "enabledSharedMemory",
    "emptyDirMounts",
}  # fmt: skip
STRICT_FIELDS = {
    "2.14": (COMMON_FIELDS, {"keyToEnv", "secretName", "secretNameParameter"}),
    "2.15": (COMMON_FIELDS, {"keyToEnv", "secretName", "secretNameParameter", "optional"}),
    "2.16": (COMMON_FIELDS | {"securityContext"}, {"keyToEnv", "secretName", "secretNameParameter", "optional"}),
    "2.17": (COMMON_FIELDS | {"securityContext"}, {"keyToEnv", "secretName", "secretNameParameter", "optional"}),
}


@pytest.fixture(scope="module", params=list(backends.BACKENDS))
def variant(request, tmp_path_factory):
    version = request.param
    path = compile_pipeline(tmp_path_factory.mktemp(f"kfp-{version}") / "retrain.yaml", version)
    spec, platform = yaml.safe_load_all(path.read_text())
    return backends.BACKENDS[version], spec, platform


def version(target) -> tuple[int, ...]:
    return tuple(int(p) for p in target.version.split("."))


def executors(platform) -> dict[str, dict]:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec) -> dict[str, dict]:
    out = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        out.update(component.get("dag", {}).get("tasks", {}))
    return out


def test_every_variant_parses_into_kfp_types(variant):
    _, spec, platform = variant
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())


def test_the_final_status_input_only_where_the_argo_compiler_accepts_it(variant):
    """2.2.0-2.5.0 argocompiler/dag.go: TaskFinalStatus -> "task final status not supported yet"; 2.14.0
    backend/src/v2/driver resolves it."""
    target, spec, _ = variant
    final_status = [
        name for name, task in all_tasks(spec).items()
        if any("taskFinalStatus" in p for p in task.get("inputs", {}).get("parameters", {}).values())
    ]  # fmt: skip
    assert final_status == (["record-status-op"] if version(target) >= (2, 14) else [])
    exit_task = next(t for n, t in spec["root"]["dag"]["tasks"].items() if n.startswith("record-status"))
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # still the exit handler


def test_the_kubernetes_config_holds_only_fields_a_strict_backend_knows(variant):
    """2.14.0+ argocompiler/container.go parses each task's config with protojson.Unmarshal (unknown field ->
    "failed to unmarshal kubernetes config"); up to 2.5.0 it is jsonpb with errors ignored."""
    target, _, platform = variant
    for name, config in executors(platform).items():
        if target.version in STRICT_FIELDS:
            fields, secret_fields = STRICT_FIELDS[target.version]
            assert set(config) <= fields, (name, set(config) - fields)
            for entry in config.get("secretAsEnv", []):
                assert set(entry) <= secret_fields, (name, set(entry) - secret_fields)
        if version(target) < (2, 16):
            assert "securityContext" not in config, name
        else:
            assert config["securityContext"]["runAsNonRoot"] is True, name


def test_optional_env_only_where_the_backend_honours_it(variant):
    """2.15.0 driver/k8s.go copies SecretAsEnv.Optional into the secretKeyRef; before, an absent key of an
    'optional' Secret leaves the pod in CreateContainerConfigError, so the field is not written there."""
    target, _, platform = variant
    optional = [
        name for name, config in executors(platform).items()
        for entry in (*config.get("secretAsEnv", []), *config.get("configMapAsEnv", []))
        if "optional" in entry
    ]  # fmt: skip
    assert bool(optional) == (version(target) >= (2, 15))


def test_gpu_counts_come_from_string_parameters(variant):
    """driver/resolve.go (2.17.0) resolvePodSpecInputRuntimeParameter returns GetStringValue(): empty for a
    number parameter, and then driver.go sets no nvidia.com/gpu limit (same code in driver.go at 2.5.0)."""
    _, spec, _ = variant
    gpu_tasks = 0
    for name, task in all_tasks(spec).items():
        component = spec["components"][task["componentRef"]["name"]]
        if "executorLabel" not in component:
            continue
        resources = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"].get("resources", {})
        count = resources.get("accelerator", {}).get("resourceCount")
        if count is None:
            continue
        gpu_tasks += 1
        if count.startswith("{{"):
            param = count.split("['")[1].split("']")[0]  # a channel the enclosing DAGs declare
            types = {
                c["inputDefinitions"]["parameters"][param]["parameterType"]
                for c in spec["components"].values()
                if param in c.get("inputDefinitions", {}).get("parameters", {})
            }
            assert types == {"STRING"}, (name, param, types)
        else:
            assert count.isdigit(), (name, count)
    assert gpu_tasks == 2  # detect and train
    assert spec["root"]["inputDefinitions"]["parameters"]["train_gpus"]["parameterType"] == "STRING"


def test_retry_windows_outlast_every_attempt(variant):
    """Argo counts backoff.maxDuration from the first attempt's start, stops retrying at that deadline and gives
    each retry it as its execution deadline (argo-workflows workflow/controller/operator.go, v3.5.14-v4.0.5,
    the versions KFP 2.5-2.17 vendor); KFP passes backoffMaxDuration through unchanged (argocompiler/container.go).
    """
    _, spec, _ = variant
    by_stage = {t["taskInfo"]["name"]: t for t in all_tasks(spec).values()}
    retried = {name for name, task in by_stage.items() if "retryPolicy" in task}
    assert retried == {name for name, p in k8s.PROFILES.items() if p.retry}
    for name in retried:
        policy = by_stage[name]["retryPolicy"]
        attempts = policy["maxRetryCount"] + 1
        backoff = int(policy["backoffDuration"].rstrip("s"))
        backoffs = sum(backoff * policy["backoffFactor"] ** i for i in range(attempts - 1))
        window = int(policy["backoffMaxDuration"].rstrip("s"))
        assert window >= attempts * k8s.PROFILES[name].worst_case_h * 3600 + backoffs, name
    assert k8s.PROFILES["train"].worst_case_h >= 12  # a long fine-tuning on a big project


def test_detect_is_left_unscheduled_without_weights_only_where_an_artifact_one_of_resolves(variant):
    """2.17.0 driver/resolve.go GetProducerTask picks the OneOf branch that completed (#13436); 2.14.0-2.16.0 take
    the last artifact selector and 2.4.0/2.5.0 driver.go keeps the last in its loop, whichever branch ran."""
    target, spec, _ = variant
    tasks = all_tasks(spec)
    one_of = {
        name: output["artifactSelectors"]
        for component in spec["components"].values()
        for name, output in component.get("dag", {}).get("outputs", {}).get("artifacts", {}).items()
        if len(output["artifactSelectors"]) > 1
    }
    detections = tasks["crop-op"]["inputs"]["artifacts"]["detections"]["taskOutputArtifact"]
    if not target.artifact_one_of:
        assert one_of == {} and "detect-skipped-op" not in tasks
        assert detections == {"outputArtifactKey": "detections", "producerTask": "detect-op"}
        return
    [(key, selectors)] = one_of.items()
    assert detections["outputArtifactKey"] == key
    branches = {s["producerSubtask"]: tasks[s["producerSubtask"]] for s in selectors}
    conditions = [t["triggerPolicy"]["condition"] for t in branches.values()]
    assert len(conditions) == 2 and all("detector_weights" in c for c in conditions)
    inner = {
        name: spec["components"][t["componentRef"]["name"]]["dag"]["tasks"] for name, t in branches.items()
    }  # each branch is a condition DAG holding one task
    [[with_weights], [without]] = [list(inner[s["producerSubtask"]]) for s in selectors]
    assert (with_weights, without) == ("detect-op", "detect-skipped-op")
    skipped = spec["components"][tasks["detect-skipped-op"]["componentRef"]["name"]]
    container = spec["deploymentSpec"]["executors"][skipped["executorLabel"]]["container"]
    assert "accelerator" not in container.get("resources", {}) and "animl-retrain-cpu" in container["image"]
    assert "inputDefinitions" not in skipped  # reads no images: nothing for the launcher to copy in


def test_kfp_local_runs_the_default_variant_so_it_holds_no_artifact_one_of():
    """kfp 2.17.0 kfp/local/orchestrator/orchestrator_utils.py get_dag_output_artifacts: "Expected 1 artifact in
    ArtifactSelectorSpec"; `make run` traces the pipeline for the default backend."""
    assert not backends.current().artifact_one_of and backends.current() is backends.BACKENDS[backends.DEFAULT]


def test_the_committed_pipeline_is_the_default_variant(tmp_path):
    assert backends.DEFAULT == "2.16"
    fresh = compile_pipeline(tmp_path / "retrain.yaml")
    assert list(yaml.safe_load_all(fresh.read_text())) == list(yaml.safe_load_all(COMPILED.read_text()))


@pytest.mark.parametrize("text", ["2.7", "2.13", "3.0", "latest", "2", "2.16.x", ""])
def test_an_unknown_backend_is_a_clear_error(text):
    with pytest.raises(ValueError, match=r"expected one of 2\.4, 2\.5, 2\.14, 2\.15, 2\.16, 2\.17"):
        backends.backend(text)


def test_patch_releases_and_kubeflow_releases_map_to_a_variant():
    assert backends.backend("2.5.0") is backends.BACKENDS["2.5"]
    assert backends.backend("2.16.1").security_context
    # kubeflow/manifests README: v1.10.1 -> 2.5.0, v1.11.0 -> 2.15.0, master (26.03) -> 2.16.0
    assert {kf: backends.BACKENDS[v].final_status for kf, v in backends.KUBEFLOW.items()} == {
        "1.10": False,
        "1.11": True,
        "26.03": True,
    }


def test_a_number_parameter_for_a_gpu_count_is_refused_when_the_pipeline_is_built():
    from kfp import dsl

    @dsl.component(base_image="python:3.11")
    def noop(n: int):
        pass

    with pytest.raises(TypeError, match="must be a str pipeline parameter"):

        @dsl.pipeline
        def bad(gpus: int = 1):
            k8s.stage("train", noop(n=gpus), gpus=gpus)


def test_without_a_final_status_the_status_step_may_reach_the_kfp_api(variant):
    """Its pod carries the label Kubeflow's PodDefault 'access-ml-pipeline' selects (a token for the API)."""
    target, _, platform = variant
    labels = executors(platform)
    status = next(config for name, config in labels.items() if name.startswith("exec-record-status"))
    label = status.get("podMetadata", {}).get("labels", {}).get(k8s.KFP_API_POD_LABEL)
    assert label == (None if target.final_status else "true")
