"""MLflow access: the tracking server comes from ``MLFLOW_TRACKING_URI`` (a Secret or ConfigMap on a cluster)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

from animl_retrain.common import PipelineError, redact_url

RUN_FILE = "mlflow_run.json"


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
