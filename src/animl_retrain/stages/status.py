"""The pipeline's exit handler: record how the run ended, even when a stage failed.

Kubeflow runs this after every other task, whatever their outcome (``dsl.ExitHandler``), and so does kfp.local.
It writes ``status.json`` (the final state, the error, the time) as an artifact of the run, and in MLflow tags
every run of this Kubeflow run (found by the ``kfp_run_id`` tag the train stage sets) with ``kfp_status``. A
training run whose pod was killed (out of memory, node lost) stays RUNNING in MLflow forever; when the
pipeline did not succeed, such runs are marked FAILED here.

The state arrives as the backend names it: the driver hands the exit handler the ML Metadata state of the block
(``GetLastKnownState().String()``, ``backend/src/v2/driver/resolve.go`` at 2.16.0): COMPLETE, CACHED, FAILED,
CANCELED, RUNNING, ...; kfp.local says SUCCEEDED. A block with a branch not taken (``deploy=False``, the incremental
skip) is left RUNNING: the DAG becomes COMPLETE only when all its tasks are (``UpdateDAGExecutionsState``,
``backend/src/v2/metadata/client.go`` at 2.16.0), and a skipped one never is; yet the exit handler runs only after
every task in it ended, so RUNNING means nothing failed. :func:`outcome` maps them all to SUCCEEDED, FAILED or
CANCELED. Where the backend cannot pass the final status at all (up to 2.5), ``state`` is empty and the stage asks
the KFP API for the run's task states.

Recording must not hide the pipeline's own outcome: a missing or unreachable tracking server is written into
``status.json`` and the log, and the task still succeeds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, Field

from animl_retrain.config import MODEL_NAME, StageConfig
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import write_json
from animl_retrain.core.logging import log, redact_url
from animl_retrain.core.report import Report
from animl_retrain.formats import layout
from animl_retrain.integrations.kubeflow import runs
from animl_retrain.integrations.mlflow import tracking

SUCCEEDED = "SUCCEEDED"
# Backend state -> outcome. Anything not listed (UNKNOWN, NEW, '') is not a success.
OUTCOMES = {
    "SUCCEEDED": SUCCEEDED,  # kfp.local, and the KFP API's run states
    "COMPLETE": SUCCEEDED,  # ML Metadata, what a cluster's driver passes
    "CACHED": SUCCEEDED,
    "SKIPPED": SUCCEEDED,
    "RUNNING": SUCCEEDED,  # a block with a skipped branch; the exit handler runs only once every task ended
    "FAILED": "FAILED",
    "CANCELED": "CANCELED",
    "CANCELLED": "CANCELED",
    "CANCELING": "CANCELED",
}


def outcome(state: str) -> str:
    """SUCCEEDED, FAILED or CANCELED for a backend's state name; UNKNOWN for one it should never send."""
    return OUTCOMES.get(state.strip().upper(), "UNKNOWN")


class StatusConfig(StageConfig):
    """What the exit handler knows about the run."""

    state: str = Field(
        "", description="the backend's final state of the pipeline's tasks (COMPLETE, FAILED, ...); '' asks the KFP API"
    )
    out: Path = Field(description="output folder for status.json")
    kfp_run_id: str = Field("", description="Kubeflow run id, as the train stage tagged its MLflow run")
    experiment: str = Field(MODEL_NAME, description="MLflow experiment the train stage logs to")
    error_message: str = Field("", description="the error Kubeflow reports for the failed task, if any")
    error_code: int | None = Field(None, description="the error code Kubeflow reports, if any")
    pipeline_task: str = Field("", description="the task group whose status this is")


class StatusResult(BaseModel):
    """What the exit handler recorded."""

    state: str
    backend_state: str = ""
    kfp_run_id: str
    mlflow_runs: list[str] = []
    marked_failed: list[str] = []
    mlflow: str = ""


def run(cfg: StatusConfig) -> StatusResult:
    """Write ``status.json`` and tag MLflow; never raise because recording failed."""
    report = Report("status")
    backend_state = cfg.state or _state_from_api(cfg.kfp_run_id, report)
    result = StatusResult(state=outcome(backend_state), backend_state=backend_state, kfp_run_id=cfg.kfp_run_id)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        result.mlflow = "not recorded: MLFLOW_TRACKING_URI is not set"
    elif not cfg.kfp_run_id:
        result.mlflow = "not recorded: no Kubeflow run id to look for"
    else:
        try:
            tracking.check_server(uri, attempts=3)
            result.mlflow_runs, result.marked_failed = tracking.tag_kfp_runs(
                cfg.kfp_run_id, cfg.experiment, result.state, succeeded=result.state == SUCCEEDED
            )
            result.mlflow = f"tagged {len(result.mlflow_runs)} run(s) in experiment {cfg.experiment!r}"
        except (PipelineError, OSError) as e:
            result.mlflow = f"not recorded: {e}"
        except Exception as e:  # an MLflow error must not turn a finished run into a failed exit handler
            result.mlflow = f"not recorded: MLflow at {redact_url(uri)} answered {type(e).__name__}: {e}"
    if result.mlflow.startswith("not recorded"):
        report.problem("mlflow", redact_url(uri) or "MLFLOW_TRACKING_URI", result.mlflow)
    write_json(
        Path(cfg.out) / layout.STATUS_FILE,
        result.model_dump()
        | {
            "error_code": cfg.error_code,
            "error_message": cfg.error_message,
            "pipeline_task": cfg.pipeline_task,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    report.counts = {"mlflow_runs": len(result.mlflow_runs), "marked_failed": len(result.marked_failed)}
    report.details.update(
        state=result.state, backend_state=backend_state, kfp_run_id=cfg.kfp_run_id, mlflow=result.mlflow
    )
    report.finish(cfg.out)
    log.info(
        "run %s finished %s (%s); MLflow: %s", cfg.kfp_run_id or "(no id)", result.state, backend_state, result.mlflow
    )
    return result


def _state_from_api(kfp_run_id: str, report: Report) -> str:
    """The run's state from the KFP API (backends without the final-status input); UNKNOWN when it cannot say."""
    if not kfp_run_id:
        report.problem("kfp-api", "kfp_run_id", "no Kubeflow run id to ask the KFP API about")
        return "UNKNOWN"
    try:
        return runs.run_state(kfp_run_id)
    except PipelineError as e:
        report.problem("kfp-api", kfp_run_id, str(e))
        return "UNKNOWN"
