"""MLflow tracking: the server (from ``MLFLOW_TRACKING_URI``: a Secret or ConfigMap on a cluster) and its runs.

The stages never import mlflow themselves: what they log, and how a training run is started, re-opened after a
preemption and closed, lives here (the registry side is :mod:`animl_retrain.integrations.mlflow.registry`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import json_safe
from animl_retrain.core.logging import log, redact_url
from animl_retrain.formats.model_folder import LABEL_INDEX_FILE, PREPROCESSING_FILE


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
            mlflow.log_dict(json_safe(data), path)
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


class TrainingRun:
    """The MLflow run of one training attempt (a new run, or the one an interrupted attempt started)."""

    def __init__(self, run_id: str, reopened: bool):
        self.run_id = run_id
        self.reopened = reopened

    def start(self, cfg, sizes: dict[str, int], index: dict, preprocessing, progress, resumed_from: str) -> None:
        """Log parameters, label index and preprocessing once; after a restart, the epochs MLflow missed."""
        import mlflow

        if not self.reopened or not mlflow.get_run(self.run_id).data.params:
            _log_run_start(cfg, sizes, index, preprocessing)
        if self.reopened:
            log.info("train: resuming MLflow run %s from %s", self.run_id, resumed_from or "its start")
            mlflow.set_tag("resumed_from", resumed_from or "start")
            _log_missing_epochs(self.run_id, progress.history)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """One finished epoch's metrics."""
        import mlflow

        mlflow.log_metrics(metrics, step=epoch)

    def finish(self, progress, calibrated: dict[str, float] | None = None) -> None:
        """The best epoch (0: the two-phase recipe's head-only model), its metrics, the temperature, the stop reason."""
        import mlflow

        best = progress.best_metrics
        mlflow.log_metrics(
            {"best_epoch": progress.best_epoch, **{f"best_{k}": v for k, v in best.items()}, **(calibrated or {})}
        )
        mlflow.set_tags({"stop_reason": progress.stop_reason, "recipe": "two-phase" if progress.head else "end-to-end"})


@contextlib.contextmanager
def training_run(cfg, store, state: dict | None, progress, location: str) -> Iterator[TrainingRun]:
    """Start the training run (or re-open it after preemption) and keep it active for the block.

    ``store`` (a resume store, or None) records a new run's id at once, so a restart logs into the same run. A
    tracking server that stops answering, here or in the block, becomes a PipelineError that says which epoch
    ``progress`` was in and whether the checkpoint at ``location`` lets a retry resume.
    """
    from mlflow.exceptions import MlflowException

    try:
        active, reopened = _start_mlflow(cfg, store, state)
        with active:
            yield TrainingRun(active.info.run_id, reopened)
    except MlflowException as e:
        raise _tracking_lost(e, progress, location) from None


def _start_mlflow(cfg, store, state: dict | None):
    """Start (or re-open, after preemption) the run; returns it and whether it was re-opened."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_experiment(cfg.experiment)
    run_id = (state or {}).get("mlflow_run_id") or (store.run_id() if store else None)
    system = cfg.log_system_metrics and _have_psutil()
    try:
        active = mlflow.start_run(
            run_id=run_id, run_name=None if run_id else cfg.run_name or None, log_system_metrics=system
        )
    except MlflowException as e:
        raise PipelineError(
            f"train: cannot re-open MLflow run {run_id} recorded at {cfg.checkpoint_uri} ({e}); "
            "is MLFLOW_TRACKING_URI the server it was created on?"
        ) from e
    if store is not None and run_id is None:
        store.write_run_id(active.info.run_id)
    return active, run_id is not None


def _have_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        log.warning("train: psutil is not installed; MLflow system metrics are off")
        return False
    return True


def _log_run_start(cfg, sizes: dict[str, int], index: dict, preprocessing) -> None:
    import mlflow

    mlflow.set_tags({"kfp_run_id": cfg.kfp_run_id, "stage": "train", "arch": cfg.arch})
    mlflow.log_params(
        {k: str(v) for k, v in cfg.model_dump(exclude={"crops", "split", "out"}).items()}
        | {f"{k}_crops": n for k, n in sizes.items()}
        | {"classes": len(index)}
    )
    mlflow.log_dict(index, LABEL_INDEX_FILE)
    mlflow.log_dict(preprocessing.to_json(), PREPROCESSING_FILE)


def _log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    """After a restart, log the epochs the checkpoint has and MLflow lacks (killed between the two)."""
    import mlflow

    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}
    for epoch, metrics in enumerate(history, start=1):
        if epoch not in logged:
            mlflow.log_metrics(metrics, step=epoch)


def _tracking_lost(error: Exception, progress, location: str) -> PipelineError:
    """The error for a tracking server that stopped answering mid-run (after MLflow's own HTTP retries)."""
    detail = redact_url(str(error).strip().splitlines()[0][:300])
    then = (
        f"the checkpoint at {redact_url(location)} is kept: a retry resumes from it in the same MLflow run"
        if location
        else "nothing can be resumed: set checkpoint_uri so that a retry continues where this one stopped"
    )
    return PipelineError(
        f"train: the MLflow tracking server {redact_url(tracking_uri())} failed during epoch "
        f"{progress.epoch} ({detail}); no model was written and nothing was registered; {then}"
    )
