"""A run's state from the Kubeflow Pipelines API, for the exit handler on backends without the final-status input.

Backends up to 2.5 refuse the exit handler's ``PipelineTaskFinalStatus`` input (``pipelines/backends.py``), so
there the status step reads the run (``GET /apis/v2beta1/runs/{run_id}``) and judges the other tasks' states
(``V2beta1RuntimeState``: SUCCEEDED, SKIPPED, FAILED, CANCELING, CANCELED, RUNNING, ...). The run itself is
still RUNNING while its exit handler runs, so its own state says nothing.

The API is ``KFP_API_URL`` (default: the in-cluster Service ``http://ml-pipeline.kubeflow:8888``). Multi-user
Kubeflow wants a bearer token: the one in ``KF_PIPELINES_SA_TOKEN_PATH`` (default: the projected token path
Kubeflow's PodDefault uses) is sent when that file exists.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import redact_url

DEFAULT_API = "http://ml-pipeline.kubeflow:8888"
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
FAILED = {"FAILED"}
CANCELED = {"CANCELED", "CANCELING"}


def state_from_tasks(tasks: list[dict], own_task: str = "status") -> str:
    """SUCCEEDED, FAILED or CANCELED from the run's task details (the exit handler's own task left out)."""
    states = {str(t.get("state", "")) for t in tasks if t.get("display_name") != own_task}
    if states & FAILED:
        return "FAILED"
    if states & CANCELED:
        return "CANCELED"
    return "SUCCEEDED"  # succeeded, skipped (a dsl.If not taken), or DAGs still open around the exit handler


def fetch_run(run_id: str, timeout: float = 30.0) -> dict:
    """The run as the v2beta1 API returns it; a PipelineError that says where and why when it cannot."""
    api = os.environ.get("KFP_API_URL", DEFAULT_API).rstrip("/")
    request = urllib.request.Request(f"{api}/apis/v2beta1/runs/{run_id}")
    token_path = Path(os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", DEFAULT_TOKEN_PATH))
    if token_path.is_file():
        request.add_header("Authorization", f"Bearer {token_path.read_text().strip()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        where = f"Kubeflow Pipelines API at {redact_url(api)}"
        raise PipelineError(f"{where} answered HTTP {e.code} for run {run_id}") from e
    except (OSError, ValueError) as e:
        raise PipelineError(f"Kubeflow Pipelines API at {redact_url(api)} unreachable for run {run_id}: {e}") from e


def run_state(run_id: str, own_task: str = "status") -> str:
    """The run's outcome so far, judged from its tasks (see :func:`state_from_tasks`)."""
    run = fetch_run(run_id)
    return state_from_tasks(run.get("run_details", {}).get("task_details", []), own_task)
