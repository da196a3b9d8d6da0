"""The pipeline's exit handler: record how the run ended, even when a stage failed.

Kubeflow runs this after every other task, whatever their outcome (``dsl.ExitHandler``), and so does kfp.local.
It writes ``status.json`` (the final state, the error, the time) as an artifact of the run, and in MLflow tags
every run of this Kubeflow run (found by the ``kfp_run_id`` tag the train stage sets) with ``kfp_status``. A
training run whose pod was killed (out of memory, node lost) stays RUNNING in MLflow forever; when the
pipeline did not succeed, such runs are marked FAILED here.

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
from animl_retrain.integrations.mlflow import tracking

SUCCEEDED = "SUCCEEDED"


class StatusConfig(StageConfig):
    """What the exit handler knows about the run."""

    state: str = Field(description="final state of the pipeline's tasks: SUCCEEDED, FAILED, CANCELED, ...")
    out: Path = Field(description="output folder for status.json")
    kfp_run_id: str = Field("", description="Kubeflow run id, as the train stage tagged its MLflow run")
    experiment: str = Field(MODEL_NAME, description="MLflow experiment the train stage logs to")
    error_message: str = Field("", description="the error Kubeflow reports for the failed task, if any")
    error_code: int | None = Field(None, description="the error code Kubeflow reports, if any")
    pipeline_task: str = Field("", description="the task group whose status this is")


class StatusResult(BaseModel):
    """What the exit handler recorded."""

    state: str
    kfp_run_id: str
    mlflow_runs: list[str] = []
    marked_failed: list[str] = []
    mlflow: str = ""


def run(cfg: StatusConfig) -> StatusResult:
    """Write ``status.json`` and tag MLflow; never raise because recording failed."""
    report = Report("status")
    result = StatusResult(state=cfg.state, kfp_run_id=cfg.kfp_run_id)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        result.mlflow = "not recorded: MLFLOW_TRACKING_URI is not set"
    elif not cfg.kfp_run_id:
        result.mlflow = "not recorded: no Kubeflow run id to look for"
    else:
        try:
            tracking.check_server(uri, attempts=3)
            result.mlflow_runs, result.marked_failed = tracking.tag_kfp_runs(
                cfg.kfp_run_id, cfg.experiment, cfg.state, succeeded=cfg.state == SUCCEEDED
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
    report.details.update(state=cfg.state, kfp_run_id=cfg.kfp_run_id, mlflow=result.mlflow)
    report.finish(cfg.out)
    log.info("run %s finished %s; MLflow: %s", cfg.kfp_run_id or "(no id)", cfg.state, result.mlflow)
    return result
