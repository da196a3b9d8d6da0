"""MLflow tracking: the server (from ``MLFLOW_TRACKING_URI``: a Secret or ConfigMap on a cluster) and its runs.

The stages never import mlflow themselves: what they log, and how a training run is started, re-opened after a
preemption and closed, lives here (the registry side is :mod:`animl_retrain.integrations.mlflow.registry`).
"""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import redact_url


def tracking_uri() -> str:
    """The MLflow tracking URI from the environment; the stages that log to MLflow need one."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise PipelineError("MLFLOW_TRACKING_URI is not set: point it at the MLflow tracking server")
    return uri


def check_server(uri: str | None = None, attempts: int = 5, timeout: float = 5.0) -> str:
    """Fail early with a clear message when the tracking server does not answer its health check."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status == 200:
                    return uri
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(min(4.0, 0.5 * 2**attempt))
    raise PipelineError(
        f"MLflow tracking server {redact_url(uri)} does not answer /health after {attempts} tries: {last}"
    )


def log_to_run(
    run_id: str,
    metrics: dict[str, float | None] | None = None,
    tags: dict[str, str] | None = None,
    dicts: dict[str, Any] | None = None,
    texts: dict[str, str] | None = None,
    artifacts: tuple[str, list[Path]] | None = None,
) -> None:
    """Add to the finished run ``run_id``: finite metrics, tags, JSON and text artifacts, and files in a folder."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        if metrics:
            mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None and math.isfinite(v)})
        if tags:
            mlflow.set_tags(tags)
        for path, data in (dicts or {}).items():
            mlflow.log_dict(data, path)
        for path, text in (texts or {}).items():
            mlflow.log_text(text, path)
        if artifacts:
            folder, files = artifacts
            for file in files:
                mlflow.log_artifact(str(file), folder)


def tag_kfp_runs(kfp_run_id: str, experiment: str, state: str, succeeded: bool) -> tuple[list[str], list[str]]:
    """Tag the MLflow runs of one Kubeflow run with its final state; close dangling ones as FAILED.

    Returns the ids of the runs tagged and of those marked FAILED (only when the pipeline did not succeed).
    """
    import mlflow

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [], []
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.kfp_run_id = '{kfp_run_id}'")
    tagged, failed = [], []
    for run in runs:
        client.set_tag(run.info.run_id, "kfp_status", state)
        tagged.append(run.info.run_id)
        if not succeeded and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(run.info.run_id)
    return tagged, failed
