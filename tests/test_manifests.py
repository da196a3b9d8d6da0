"""The Kubernetes manifests: every overlay renders with kustomize and validates strictly, offline.

Beyond the schema: the objects the compiled pipeline names exist with the keys it reads, nothing carries a
credential, and MLflow's ``--allowed-hosts`` really admits the Service's names (checked on a real MLflow server).
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from animl_retrain.pipelines import k8s

from animl_retrain.tools import kubeflow

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.32.0"  # the kubectl this project is checked with
NAMESPACE = {"aws": "kubeflow", "generic": "kubeflow", "profile": None}  # profile: `kubectl apply -n <ns>`
PROFILE_NS = "team-a"  # a profile namespace, for what the profile overlay builds from the pod's namespace


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is needed to render the manifests (kubectl kustomize)")
        pytest.skip("kubectl not installed: the manifests cannot be rendered here")
    return path


def render(overlay: str) -> list[dict]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def config_map(docs: list[dict], name: str) -> dict:
    [found] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].split("-")[0] == name]
    return found


def test_there_are_a_generic_an_aws_and_a_profile_overlay():
    assert OVERLAYS == ["aws", "generic", "profile"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {d["metadata"].get("namespace") for d in docs} == {NAMESPACE[overlay]}


def test_strict_validation_rejects_an_unknown_field():
    [deployment] = by_kind(render("generic"), "Deployment").values()
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_non_root_with_resources_and_probes_under_restricted_pod_security(overlay):
    docs = render(overlay)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert "mlflow" in {w["metadata"]["name"] for w in workloads}
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert set(container["resources"]) == {"requests", "limits"}, container["name"]
            assert container["resources"]["limits"]["memory"], container["name"]
            assert container.get("readinessProbe") and container.get("livenessProbe"), container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # Pod Security Standards "restricted" (so baseline too): seccomp, no host namespaces or paths.
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in pod.get("volumes", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_rendered_and_no_credential_is_written(overlay):
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by hand (manifests/secrets/)"
    text = yaml.safe_dump_all(docs)
    for word in ("AKIA", "password=", "PASSWORD=", "secretkey:"):
        assert word not in text
    for container in by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]:
        for env in container["env"]:
            if any(w in env["name"] for w in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert "secretKeyRef" in env.get("valueFrom", {}), env


def test_secret_templates_hold_no_values():
    templates = {}
    for path in sorted((MANIFESTS / "secrets").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert "namespace" not in doc["metadata"], path.name  # created in the pipeline's namespace, whichever
        templates[doc["metadata"]["name"]] = doc["stringData"]
    for data in templates.values():
        for key, value in data.items():
            if any(w in key for w in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert value == "", key
    # The keys are the ones the pipeline reads (pipelines/k8s.py).
    assert set(templates[k8s.S3_SECRET]) == set(k8s.S3_KEYS)
    assert set(templates[k8s.MLFLOW_SECRET]) == {k8s.MLFLOW_URI_KEY, *k8s.MLFLOW_AUTH_KEYS}
    assert templates[k8s.MLFLOW_SECRET][k8s.MLFLOW_URI_KEY] == "http://mlflow:5000"  # any namespace
    assert set(templates["mlflow-db"]) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert set(templates[k8s.ANIML_SECRET]) == set(k8s.ANIML_KEYS)
    assert set(templates[k8s.AWS_DEPLOY_SECRET]) == set(k8s.AWS_DEPLOY_KEYS)
    assert not any(templates[k8s.ANIML_SECRET].values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_objects_the_pipeline_names_exist(overlay):
    docs = render(overlay)
    settings = by_kind(docs, "ConfigMap")[k8s.SETTINGS_CONFIGMAP]["data"]
    assert set(settings) <= set(k8s.SETTINGS_KEYS) and settings["AWS_DEFAULT_REGION"]
    assert ("AWS_ENDPOINT_URL_S3" in settings) == (overlay != "aws")
    accounts = by_kind(docs, "ServiceAccount")
    assert kubeflow.DEFAULT_SERVICE_ACCOUNT in accounts
    [binding] = by_kind(docs, "RoleBinding").values()
    assert binding["subjects"][0]["name"] == kubeflow.DEFAULT_SERVICE_ACCOUNT
    irsa = "eks.amazonaws.com/role-arn"
    for account in (kubeflow.DEFAULT_SERVICE_ACCOUNT, "mlflow"):
        annotations = accounts[account]["metadata"].get("annotations", {})
        assert (irsa in annotations) == (overlay == "aws"), account


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_launcher_is_left_to_kfp_unless_the_storage_needs_it(overlay):
    """KFP owns kfp-launcher (and the profile controller writes it per namespace, pipelines-profile-controller
    sync.py): only the aws overlay, whose pipeline root is your S3 bucket, sets it."""
    launchers = by_kind(render(overlay), "ConfigMap")
    assert ("kfp-launcher" in launchers) == (overlay == "aws")
    if overlay == "aws":
        launcher = launchers["kfp-launcher"]["data"]
        assert launcher["defaultPipelineRoot"].startswith("s3://")
        s3 = yaml.safe_load(launcher["providers"])["s3"]["default"]
        assert s3["endpoint"] and s3["region"]
        assert s3["credentials"] == {"fromEnv": True} and s3["disableSSL"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_the_expected_clients(overlay):
    policies = by_kind(render(overlay), "NetworkPolicy")
    mlflow = policies["mlflow"]["spec"]
    assert mlflow["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
    assert mlflow["ingress"][0]["ports"] == [{"port": 5000, "protocol": "TCP"}]
    if overlay != "aws":
        postgres = policies["mlflow-postgres"]["spec"]
        assert postgres["ingress"][0]["from"] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}
        ]


def service_names(docs, namespace: str) -> list[str]:
    service = by_kind(docs, "Service")["mlflow"]
    name = service["metadata"]["name"]
    assert service["metadata"].get("namespace") in (namespace, None)
    port = service["spec"]["ports"][0]["port"]
    hosts = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    return hosts + [f"{h}:{port}" for h in hosts]


def mlflow_container(docs) -> tuple[dict, dict]:
    [container] = by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    return container, config_map(docs, "mlflow")["data"]


def mlflow_env(docs, namespace: str) -> dict[str, str]:
    """MLflow's environment values as the kubelet resolves them: ConfigMap keys, $(VAR) of earlier variables."""
    container, settings = mlflow_container(docs)
    env: dict[str, str] = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "configMapKeyRef" in source:
            env[var["name"]] = settings.get(source["configMapKeyRef"]["key"], "")
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
        elif "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_allowed_hosts_cover_every_name_of_the_service(overlay):
    docs = render(overlay)
    namespace = NAMESPACE[overlay] or PROFILE_NS
    container, _ = mlflow_container(docs)
    assert "--allowed-hosts=$(ALLOWED_HOSTS)" in container["args"]
    allowed = mlflow_env(docs, namespace)["ALLOWED_HOSTS"].split(",")
    assert set(service_names(docs, namespace)) <= set(allowed)
    assert "*" not in allowed and "$(" not in ",".join(allowed)


def test_the_profile_overlay_keeps_to_the_namespaces_own_prefix_and_credentials():
    """The profile controller's SeaweedFS policy allows mlpipeline/private-artifacts/<ns>/* (sync.py)."""
    docs = render("profile")
    env = mlflow_env(docs, PROFILE_NS)
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://mlpipeline/private-artifacts/{PROFILE_NS}/mlflow"
    container, _ = mlflow_container(docs)
    keys = {
        v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"] if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert keys["AWS_ACCESS_KEY_ID"] == {"name": "mlpipeline-minio-artifact", "key": "accesskey"}
    assert keys["AWS_SECRET_ACCESS_KEY"] == {"name": "mlpipeline-minio-artifact", "key": "secretkey"}
    assert "kubeflow" not in yaml.safe_dump_all(d for d in docs if d["kind"] != "ConfigMap")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_and_postgres_opt_out_of_the_istio_sidecar(overlay):
    """Pipeline pods get no sidecar (backend/src/apiserver/template/argo_template.go, 2.16.0), so they cannot
    pass Kubeflow's mesh-wide deny-all AuthorizationPolicy into a meshed server: MLflow and PostgreSQL stay out."""
    workloads = [d for d in render(overlay) if d["kind"] in ("Deployment", "StatefulSet")]
    assert {w["metadata"]["name"] for w in workloads} == (
        {"mlflow"} if overlay == "aws" else {"mlflow", "mlflow-postgres"}
    )
    for workload in workloads:
        meta = workload["spec"]["template"]["metadata"]
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false", workload["metadata"]["name"]
        assert meta["labels"]["sidecar.istio.io/inject"] == "false", workload["metadata"]["name"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@contextlib.contextmanager
def mlflow_server_like_the_deployment(docs, tmp_path, namespace="kubeflow"):
    """``mlflow server`` with the Deployment's arguments and environment names, on loopback with SQLite."""
    container, _ = mlflow_container(docs)
    port = _free_port()
    args = [
        a.replace("$(ALLOWED_HOSTS)", mlflow_env(docs, namespace)["ALLOWED_HOSTS"])
        for a in container["args"]
        if not a.startswith(("--host=", "--port=", "--workers="))
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))} | {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
    }
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= {e["name"] for e in container["env"]}
    log = open(tmp_path / "mlflow.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *args, "--host=127.0.0.1", f"--port={port}", "--workers=1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while _status_or_none(url + "/health") != 200:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "MLflow did not answer /health in 150 s"
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def _status_or_none(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except OSError:
        return None


@pytest.mark.server
@pytest.mark.timeout(240)
@pytest.mark.parametrize("overlay", ["generic", "profile"])
def test_mlflow_admits_its_service_names_and_refuses_others(overlay, tmp_path):
    docs = render(overlay)
    namespace = NAMESPACE[overlay] or PROFILE_NS
    with mlflow_server_like_the_deployment(docs, tmp_path, namespace) as url:
        api = url + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        for host in service_names(docs, namespace):
            assert _status(api, host) == 200, host
        assert _status(api, "evil.example:5000") == 403
        assert _status(api, "mlflow.other-namespace.svc.cluster.local:5000") == 403
    assert (tmp_path / "mlflow.db").is_file(), "the server ignored MLFLOW_BACKEND_STORE_URI"
