"""Submit, schedule and list runs on a Kubeflow Pipelines cluster (the CLI's ``submit``, ``schedule``, ``runs``).

Each submission compiles the pipeline here (images from ``IMAGE_REGISTRY``/``IMAGE_TAG``, GPU node settings from
``GPU_NODE_SELECTOR``/``GPU_TOLERATION``) and uploads it as a new version of one pipeline, so the Kubeflow UI
shows every version that ever ran and a data scientist can start a run from it with every parameter visible.
Runs and recurring runs refer to that uploaded version. Parameters are checked against the compiled pipeline
before anything is sent. The API endpoint comes from ``--host`` (or ``KF_PIPELINES_ENDPOINT``); a bearer token,
where the cluster needs one, from ``KFP_TOKEN`` (never a flag, so it stays out of shell history).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log

DEFAULT_EXPERIMENT = "animl-retrain"
DEFAULT_SERVICE_ACCOUNT = "animl-retrain-pipeline"  # created by manifests/ with the RBAC it needs
WEEKLY = "0 0 3 * * 0"  # Sundays 03:00 (KFP cron: seconds first)


@dataclass
class Connection:
    """Where the Kubeflow Pipelines API and UI are."""

    host: str
    namespace: str | None = None
    ui_url: str | None = None

    @property
    def ui(self) -> str:
        """Base URL of the Kubeflow Pipelines UI (links printed for runs)."""
        return (self.ui_url or self.host).rstrip("/")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The kfp client prints links and warnings on stdout; keep stdout for our own answer."""
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def client(conn: Connection):
    """A ``kfp.Client`` for ``conn``; a failure to reach the API becomes a one-line error."""
    import kfp

    if not conn.host:
        raise PipelineError("no Kubeflow Pipelines endpoint: give --host URL or set KF_PIPELINES_ENDPOINT")
    if not conn.host.startswith(("http://", "https://")):
        raise PipelineError(f"--host {conn.host!r}: give the URL with http:// or https://")
    try:
        with _quiet():
            return kfp.Client(
                host=conn.host, namespace=conn.namespace or "kubeflow", existing_token=os.environ.get("KFP_TOKEN")
            )
    except Exception as e:
        raise PipelineError(f"cannot reach Kubeflow Pipelines at {conn.host}: {_reason(e)}") from e


def _reason(e: Exception) -> str:
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    return f"HTTP {status} {reason}" if status else f"{type(e).__name__}: {e}"


def check_cron(cron: str) -> str:
    """Refuse anything but KFP's 6-field cron (seconds first), with the fix in the message."""
    fields = cron.split()
    if len(fields) == 5:
        raise PipelineError(
            f"--cron {cron!r} has 5 fields; Kubeflow's cron has 6, seconds first: try '0 {cron}' "
            f"(weekly on Sunday at 03:00 is '{WEEKLY}')"
        )
    if len(fields) != 6:
        raise PipelineError(f"--cron {cron!r}: expected 6 fields (seconds minutes hours day-of-month month weekday)")
    return " ".join(fields)


def compile_package(directory: Path, kfp_backend: str | None = None) -> tuple[Path, dict]:
    """Compile the pipeline (for ``kfp_backend``) into ``directory``; return the file and its root inputs."""
    from animl_retrain.pipelines import backends
    from animl_retrain.pipelines.retrain import compile_pipeline

    try:
        path = compile_pipeline(Path(directory) / "retrain.yaml", kfp_backend or backends.DEFAULT)
    except ValueError as e:
        raise PipelineError(str(e)) from e
    spec = next(yaml.safe_load_all(path.read_text()))
    return path, spec["root"]["inputDefinitions"]["parameters"]


def check_params(params: dict[str, Any], inputs: dict[str, dict]) -> dict[str, Any]:
    """Every parameter known to the pipeline, every required one given."""
    unknown = sorted(set(params) - set(inputs))
    if unknown:
        raise PipelineError(f"unknown pipeline parameters {unknown}; known: {sorted(inputs)}")
    missing = sorted(n for n, d in inputs.items() if not d.get("isOptional") and n not in params)
    if missing:
        raise PipelineError(f"missing pipeline parameters {missing} (give them with --params FILE or --set KEY=VALUE)")
    return normalise_gpus(params)


def normalise_gpus(params: dict[str, Any]) -> dict[str, Any]:
    """``train_gpus`` as the string the pipeline takes (a YAML ``1`` becomes ``'1'``), checked."""
    from animl_retrain.core.checks import gpu_count

    if "train_gpus" in params:
        params = params | {"train_gpus": str(gpu_count(params["train_gpus"]))}
    return params


def upload_version(kfp_client, package: Path, pipeline_name: str) -> tuple[str, str]:
    """Upload ``package`` as a new version of ``pipeline_name`` (created on first use); return both ids."""
    from animl_retrain.components.container_images import TAG

    version_name = f"{TAG}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    with _quiet():
        pipeline_id = kfp_client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            pipeline_id = kfp_client.upload_pipeline(
                str(package),
                pipeline_name=pipeline_name,
                description="Retrain Animl's species classifier from human-validated labels.",
            ).pipeline_id
            versions = kfp_client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
            version_id = versions.pipeline_versions[0].pipeline_version_id
        else:
            version_id = kfp_client.upload_pipeline_version(
                str(package), version_name, pipeline_id=pipeline_id
            ).pipeline_version_id
    log.info("uploaded pipeline %s version %s", pipeline_id, version_id)
    return pipeline_id, version_id


def _prepare(conn: Connection, params: dict[str, Any], experiment: str, kfp_backend: str | None):
    from animl_retrain.pipelines.retrain import PIPELINE_NAME

    kfp_client = client(conn)
    with tempfile.TemporaryDirectory(prefix="animl-kfp-") as tmp:
        package, inputs = compile_package(Path(tmp), kfp_backend)
        params = check_params(params, inputs)
        try:
            pipeline_id, version_id = upload_version(kfp_client, package, PIPELINE_NAME)
            with _quiet():
                experiment_id = kfp_client.create_experiment(experiment, namespace=conn.namespace).experiment_id
        except Exception as e:
            raise PipelineError(f"Kubeflow Pipelines at {conn.host} refused the upload: {_reason(e)}") from e
    return kfp_client, pipeline_id, version_id, experiment_id, params


def submit(
    conn: Connection,
    params: dict[str, Any],
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str = "",
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    kfp_backend: str | None = None,
) -> dict[str, str]:
    """Upload a pipeline version (compiled for ``kfp_backend``) and start one run of it; return its id and link."""
    kfp_client, pipeline_id, version_id, experiment_id, params = _prepare(conn, params, experiment, kfp_backend)
    name = run_name or f"retrain {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}"
    try:
        with _quiet():
            run = kfp_client.run_pipeline(
                experiment_id=experiment_id,
                job_name=name,
                params=params,
                pipeline_id=pipeline_id,
                version_id=version_id,
                service_account=service_account or None,
            )
    except Exception as e:
        raise PipelineError(f"Kubeflow Pipelines at {conn.host} refused the run: {_reason(e)}") from e
    return {"run_id": run.run_id, "url": f"{conn.ui}/#/runs/details/{run.run_id}", "pipeline_version": version_id}


def schedule(
    conn: Connection,
    params: dict[str, Any],
    cron: str = WEEKLY,
    name: str = "animl-retrain weekly",
    experiment: str = DEFAULT_EXPERIMENT,
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    kfp_backend: str | None = None,
) -> dict[str, str]:
    """Upload a pipeline version and run it on a cron schedule (one at a time, no catch-up of missed runs)."""
    cron = check_cron(cron)
    kfp_client, pipeline_id, version_id, experiment_id, params = _prepare(conn, params, experiment, kfp_backend)
    try:
        with _quiet():
            job = kfp_client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=name,
                cron_expression=cron,
                max_concurrency=1,
                no_catchup=True,
                params=params,
                pipeline_id=pipeline_id,
                version_id=version_id,
                service_account=service_account or None,
            )
    except Exception as e:
        raise PipelineError(f"Kubeflow Pipelines at {conn.host} refused the schedule: {_reason(e)}") from e
    rid = job.recurring_run_id
    return {"recurring_run_id": rid, "cron": cron, "url": f"{conn.ui}/#/recurringrun/details/{rid}"}


def list_runs(conn: Connection, experiment: str | None = DEFAULT_EXPERIMENT, limit: int = 10) -> list[dict[str, Any]]:
    """The most recent runs (of one experiment, or all), newest first."""
    kfp_client = client(conn)
    try:
        with _quiet():
            experiment_id = None
            if experiment:
                experiment_id = kfp_client.get_experiment(
                    experiment_name=experiment, namespace=conn.namespace
                ).experiment_id
            response = kfp_client.list_runs(
                experiment_id=experiment_id, page_size=limit, sort_by="created_at desc", namespace=conn.namespace
            )
    except ValueError as e:  # the client's "No experiment is found with name ..."
        raise PipelineError(f"{e} (at {conn.host})") from e
    except Exception as e:
        raise PipelineError(f"cannot list runs at {conn.host}: {_reason(e)}") from e
    return [
        {
            "run_id": r.run_id,
            "name": r.display_name,
            "state": r.state or "",
            "created": r.created_at.strftime("%Y-%m-%d %H:%M") if r.created_at else "",
            "url": f"{conn.ui}/#/runs/details/{r.run_id}",
        }
        for r in response.runs or []
    ]


def format_runs(runs: list[dict[str, Any]]) -> str:
    """The runs as an aligned table."""
    if not runs:
        return "no runs\n"
    width = max(len(r["name"]) for r in runs)
    lines = [f"{'created':<16}  {'state':<10}  {'name':<{width}}  run id"]
    lines += [f"{r['created']:<16}  {r['state']:<10}  {r['name']:<{width}}  {r['run_id']}" for r in runs]
    return "\n".join(lines) + "\n"


def as_json(data: Any) -> str:
    """Pretty JSON for ``--json`` output."""
    return json.dumps(data, indent=2, default=str)
