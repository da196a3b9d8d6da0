"""MLflow access: the tracking server comes from ``MLFLOW_TRACKING_URI`` (a Secret or ConfigMap on a cluster)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import redact_url

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


def champion(model_name: str, alias: str = "champion", timeout: float = 15.0) -> dict | None:
    """The registry's ``alias`` version of ``model_name`` as ``{"version", "tags"}``, or None if there is none.

    Uses MLflow's REST API (``GET /api/2.0/mlflow/registered-models/alias``) with the standard client
    environment (``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), so light steps can ask
    without the mlflow package.
    """
    import base64
    import json
    import urllib.parse

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise PipelineError(f"MLFLOW_TRACKING_URI {redact_url(uri)} is not an http(s) tracking server")
    query = urllib.parse.urlencode({"name": model_name, "alias": alias})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/registered-models/alias?{query}")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            version = json.loads(resp.read()).get("model_version") or {}
    except urllib.error.HTTPError as e:
        body = e.read()[:1000].decode("utf-8", "replace")
        # No such model: 404 RESOURCE_DOES_NOT_EXIST; no such alias: 400 INVALID_PARAMETER_VALUE "... not found".
        if e.code == 404 or "RESOURCE_DOES_NOT_EXIST" in body or (e.code == 400 and "not found" in body):
            return None
        raise PipelineError(
            f"MLflow {redact_url(uri)}: cannot read {model_name}@{alias}: HTTP {e.code} {body}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        raise PipelineError(f"MLflow {redact_url(uri)} is not reachable to read {model_name}@{alias}: {e}") from None
    if not version:
        return None
    tags = {t["key"]: t.get("value", "") for t in version.get("tags") or []}
    return {"version": str(version.get("version", "")), "tags": tags}
