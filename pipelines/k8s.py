"""How each task runs on Kubernetes, in one place: resources, GPUs, scheduling, secrets, retries and caching.

The pipeline wraps every task in :func:`stage`, which looks the stage up in :data:`PROFILES` and applies it.
kfp.local ignores all of it (resources with a warning, kfp-kubernetes settings silently, retries honoured),
so the same pipeline still runs on one machine.

- **GPU stages** request ``nvidia.com/gpu`` (the count is a pipeline parameter), tolerate the GPU nodes' taint,
  select the GPU node pool by a node label, and get a memory-backed ``/dev/shm`` for DataLoader workers (a
  container's default 64 MB makes multi-worker loading crash).
- **CPU stages** get CPU and memory requests and limits; memory request = limit, so a stage is never killed
  because a neighbour grew.
- **Secrets** reach the containers as environment variables from Kubernetes Secrets (see ``manifests/``): the
  compiled pipeline names the Secret and its keys, never a value, and no parameter carries a credential.
- **Retries** with exponential backoff on the stages that talk to S3 or MLflow, and on training and detection, whose
  GPU node may be a preempted spot instance (a retried train task resumes from its checkpoint, detect from its
  shards). Argo counts ``backoff.maxDuration`` from the first attempt's start, retries nothing after it and gives
  each retry that deadline (argo-workflows ``workflow/controller/operator.go``, v3.5-v4.0), so each retried stage's
  window is its worst-case attempt times the attempts, plus the backoffs (:func:`retry_window`). Argo retries a pod
  whose container failed (a graceful node shutdown, a SIGTERM): KFP sets no ``retryPolicy`` at any tag, and Argo's
  default ``OnFailure`` does not retry a pod that was deleted outright (node gone: the node is an Error); retry the
  run then (it keeps its run id, so train resumes from its checkpoint). A stage's own bad-input error is retried too
  (Kubeflow cannot tell them apart) and fails the same way 90 s later.
- **Caching** is off where a cached result would be wrong: stages with side effects (train, register, the exit
  handler) and stages whose input can change behind the same parameters (export re-reads an export that Animl
  may have rewritten at the same URI; evaluate compares with whatever model is champion now).

The GPU node label and taint differ between clusters; they are read when the pipeline is compiled, from
``GPU_NODE_SELECTOR`` (``key=value``; empty for none) and ``GPU_TOLERATION`` (a taint key; empty for none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from animl_retrain.pipelines import backends
from kfp import dsl, kubernetes
from kfp.dsl.pipeline_channel import PipelineChannel

from animl_retrain.integrations.animl.client import SECRET_KEYS as ANIML_KEYS
from animl_retrain.integrations.animl.client import (
    SECRET_NAME as ANIML_SECRET,  # the dedicated Animl user; absent for files
)
from animl_retrain.integrations.aws.sagemaker import DEPLOY_KEYS as AWS_DEPLOY_KEYS

# Kubernetes objects the tasks read, created from manifests/: names and keys only.
S3_SECRET = "animl-s3"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; may be absent (IRSA on EKS)
MLFLOW_SECRET = "animl-mlflow"  # MLFLOW_TRACKING_URI; MLFLOW_TRACKING_USERNAME/PASSWORD optional
SETTINGS_CONFIGMAP = "animl-retrain"  # AWS_ENDPOINT_URL_S3 (not on AWS), AWS_DEFAULT_REGION
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_URI_KEY = "MLFLOW_TRACKING_URI"
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Animl's AWS account for deploy (SageMaker, SSM, the model bucket); absent with IRSA. No S3 endpoint override:
# the model bucket is on AWS even where the pipeline's own data sits in SeaweedFS. Their own names
# (ANIML_DEPLOY_AWS_*): as AWS_ACCESS_KEY_ID they would outrank IRSA for the launcher's artifact transfer too.
AWS_DEPLOY_SECRET = "animl-aws-deploy"
SETTINGS_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
KFP_API_POD_LABEL = "access-ml-pipeline"  # Kubeflow's PodDefault for in-cluster KFP API access selects it

GPU_RESOURCE = "nvidia.com/gpu"
# Defaults: the label NVIDIA's GPU operator (GPU feature discovery) puts on GPU nodes, and the taint that
# EKS, GKE and AKS GPU node pools carry.
DEFAULT_GPU_NODE_SELECTOR = "nvidia.com/gpu.present=true"
DEFAULT_GPU_TOLERATION = "nvidia.com/gpu"
SHM_SIZE = "8Gi"

RETRIES = 2
RETRY_BACKOFF_S = 30  # then 60 s: enough to ride out an S3 throttle or an MLflow pod restart
RETRY_BACKOFF_FACTOR = 2.0


@dataclass(frozen=True)
class Profile:
    """Where and how one stage runs on the cluster."""

    cpu: str  # request; the limit is twice this
    memory: str  # request and limit
    gpu: bool = False
    s3: bool = False  # reads user buckets (export, images, initial weights)
    mlflow: bool = False  # talks to the tracking server
    animl: bool = False  # logs in to Animl's API (export from 'animl-api')
    aws: bool = False  # calls AWS itself (SageMaker, SSM, the model bucket): deploy
    retry: bool = False
    cache: bool = True
    worst_case_h: float = 1.0  # the longest one attempt may take, in hours (sets the retry window)


# Starting points for a few thousand images; raise memory for large projects (crop holds one image per worker).
PROFILES = {
    "export": Profile(cpu="500m", memory="2Gi", s3=True, mlflow=True, animl=True, retry=True, cache=False),
    "download": Profile(cpu="1", memory="2Gi", s3=True, retry=True, worst_case_h=4),
    "cct-to-md": Profile(cpu="500m", memory="1Gi"),
    "detect": Profile(cpu="4", memory="16Gi", gpu=True, s3=True, retry=True, worst_case_h=12),
    "detect-skipped": Profile(cpu="250m", memory="512Mi"),
    "crop": Profile(cpu="2", memory="4Gi"),
    "split": Profile(cpu="500m", memory="1Gi"),
    "train": Profile(cpu="4", memory="24Gi", gpu=True, s3=True, mlflow=True, retry=True, cache=False, worst_case_h=24),
    "evaluate": Profile(cpu="2", memory="8Gi", mlflow=True, cache=False),
    "register": Profile(cpu="1", memory="4Gi", mlflow=True, retry=True, cache=False),
    "deploy": Profile(cpu="2", memory="6Gi", mlflow=True, aws=True, cache=False),
    "status": Profile(cpu="250m", memory="1Gi", mlflow=True, cache=False),
}


def retry_window(profile: Profile) -> int:
    """Seconds from the first attempt's start that let every attempt run its worst case, backoffs included."""
    backoffs = sum(RETRY_BACKOFF_S * RETRY_BACKOFF_FACTOR**i for i in range(RETRIES))
    return int((RETRIES + 1) * profile.worst_case_h * 3600 + backoffs)


def _cpu_limit(request: str) -> str:
    millis = int(request[:-1]) if request.endswith("m") else int(float(request) * 1000)
    return f"{2 * millis}m"


def gpu_node_selector() -> tuple[str, str] | None:
    """The GPU node pool's label as (key, value), from ``GPU_NODE_SELECTOR``; None when it is empty."""
    text = os.environ.get("GPU_NODE_SELECTOR", DEFAULT_GPU_NODE_SELECTOR).strip()
    if not text:
        return None
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"GPU_NODE_SELECTOR={text!r}: expected key=value (or empty for no node selector)")
    return key, value


def stage(name: str, task: dsl.PipelineTask, gpus: str | PipelineChannel = "1") -> dsl.PipelineTask:
    """Name ``task`` and apply its stage's profile; ``gpus`` is the GPU count of GPU stages.

    A count from a pipeline parameter must be a ``str`` parameter: the driver resolves the placeholder with
    ``GetStringValue()`` (``resolvePodSpecInputRuntimeParameter``, ``backend/src/v2/driver/resolve.go`` at
    2.17.0; ``driver.go`` at 2.5.0), which is empty for a number, and then sets no ``nvidia.com/gpu`` limit.
    """
    if isinstance(gpus, PipelineChannel) and gpus.channel_type != "String":
        raise TypeError(f"stage {name!r}: the GPU count must be a str pipeline parameter, not {gpus.channel_type}")
    profile = PROFILES[name]
    task.set_display_name(name)
    task.set_cpu_request(profile.cpu).set_cpu_limit(_cpu_limit(profile.cpu))
    task.set_memory_request(profile.memory).set_memory_limit(profile.memory)
    if profile.gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        taint = os.environ.get("GPU_TOLERATION", DEFAULT_GPU_TOLERATION).strip()
        if taint:
            kubernetes.add_toleration(task, key=taint, operator="Exists", effect="NoSchedule")
        if selector := gpu_node_selector():
            kubernetes.add_node_selector(task, *selector)
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
        )
    if profile.s3:
        kubernetes.use_config_map_as_env(task, SETTINGS_CONFIGMAP, {k: k for k in SETTINGS_KEYS}, optional=True)
        kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in S3_KEYS}, optional=True)
    if profile.mlflow:
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {MLFLOW_URI_KEY: MLFLOW_URI_KEY})
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {k: k for k in MLFLOW_AUTH_KEYS}, optional=True)
    if profile.aws:
        kubernetes.use_secret_as_env(task, AWS_DEPLOY_SECRET, {k: k for k in AWS_DEPLOY_KEYS}, optional=True)
    if profile.animl:
        kubernetes.use_secret_as_env(task, ANIML_SECRET, ANIML_KEYS, optional=True)
    if profile.retry:
        task.set_retry(
            num_retries=RETRIES,
            backoff_duration=f"{RETRY_BACKOFF_S}s",
            backoff_factor=RETRY_BACKOFF_FACTOR,
            backoff_max_duration=f"{retry_window(profile)}s",
        )
    if name == "status" and not backends.current().final_status:
        # The status step asks the KFP API for the run's state there; on multi-user Kubeflow, this label lets the
        # namespace's PodDefault 'access-ml-pipeline' mount a token for it (docs/kubeflow.md).
        kubernetes.add_pod_label(task, KFP_API_POD_LABEL, "true")
    task.set_caching_options(profile.cache)
    if backends.current().security_context:  # 2.14-2.15 refuse the field, older backends ignore it
        kubernetes.set_security_context(task, run_as_non_root=True)
    return task
