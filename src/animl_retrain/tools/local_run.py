"""Run the Kubeflow pipeline on this machine with ``kfp.local`` and summarise what every stage did.

The very pipeline that is compiled for Kubernetes runs here through kfp's SubprocessRunner: each component
executes in a subprocess of this virtualenv, artifacts live under a local pipeline root, and the S3 and MLflow
endpoints come from the environment exactly as they do from Secrets on a cluster.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log
from animl_retrain.core.report import REPORT_NAME

# Task name in the compiled pipeline -> the output folder holding its report.
STAGE_OUTPUTS = {
    "export-op": "export",
    "download-op": "images",
    "cct-to-md-op": "ground_truth",
    "detect-op": "detections",
    "crop-op": "crops",
    "split-op": "split",
    "train-op": "model",
    "evaluate-op": "evaluation",
    "register-op": "registration",
    "deploy-op": "deployment",
}


def load_params(path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """Pipeline parameters from a YAML file, then ``key=value`` overrides (values parsed as YAML scalars)."""
    params: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise PipelineError(f"{path}: must be a YAML mapping of pipeline parameters")
        params.update(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise PipelineError(f"--set {item!r}: expected key=value")
        params[key.strip()] = yaml.safe_load(value)
    return params


def _check_params(params: dict[str, Any]) -> None:
    import inspect

    from animl_retrain.pipelines.retrain import retrain_pipeline

    signature = inspect.signature(retrain_pipeline.pipeline_func)
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise PipelineError(f"unknown pipeline parameters {unknown}; known: {sorted(signature.parameters)}")
    missing = [n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise PipelineError(f"missing pipeline parameters {missing}")


def run_local(params: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """Run the pipeline locally; return the summary built from every stage's report."""
    import kfp.local

    from animl_retrain.pipelines.retrain import PIPELINE_NAME, retrain_pipeline

    _check_params(params)
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    before = set(pipeline_root.iterdir())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            retrain_pipeline(**params)
        except RuntimeError as e:
            raise PipelineError(f"the pipeline failed: {e}; the failing task's log is printed above") from e
    seconds = time.perf_counter() - start
    runs = [p for p in set(pipeline_root.iterdir()) - before if p.name.startswith(PIPELINE_NAME)]
    if len(runs) != 1:
        raise PipelineError(f"cannot find this run's folder under {pipeline_root}")
    return summarise(runs[0], seconds)


def summarise(run_dir: Path, seconds: float) -> dict[str, Any]:
    """Collect each stage's ``report.json`` from a local run folder."""
    stages = {}
    for task, output in STAGE_OUTPUTS.items():
        report = run_dir / task / output / REPORT_NAME
        if report.is_file():
            stages[task.removesuffix("-op")] = json.loads(report.read_text())
    return {"run_dir": str(run_dir), "seconds": round(seconds, 1), "stages": stages}


def format_summary(summary: dict[str, Any], mlflow_ui: str | None = None) -> str:
    """A short human-readable account of the run."""
    lines = [
        "",
        f"Pipeline finished in {summary['seconds']:.0f} s ({summary['run_dir']})",
        "",
        f"{'stage':<10} {'seconds':>8}  counts",
    ]
    for name, rep in summary["stages"].items():
        counts = ", ".join(f"{k} {v}" for k, v in rep.get("counts", {}).items())
        problems = sum(rep.get("problem_counts", {}).values())
        lines.append(
            f"{name:<10} {rep.get('seconds', 0):>8.1f}  {counts}" + (f"  [{problems} reported]" if problems else "")
        )
    export = summary["stages"].get("export", {})
    if export.get("decision") == "skip":
        lines += ["", f"Training skipped: {export.get('decision_reason', '')}"]
    ev = summary["stages"].get("evaluate", {})
    if ev:
        lines += [
            "",
            f"Test set: top-1 {ev['top1']:.3f}, macro-F1 {ev['macro_f1']:.3f} on {ev['counts']['test_crops']} crops",
        ]
        if ev.get("thresholds"):
            shown = ", ".join(f"{label} >= {t:.2f}" for label, t in ev["thresholds"].items())
            rate = ev.get("native_flagged_rate")
            lines.append(
                f"Invasive thresholds: {shown}; natives flagged invasive: "
                + ("n/a" if rate is None else f"{100 * rate:.1f}%")
                + f" (report: {summary['run_dir']}/evaluate-op/evaluation/report.html)"
            )
        if ev.get("champion_macro_f1") is not None:
            lines.append(f"Previous champion on the same test set: macro-F1 {ev['champion_macro_f1']:.3f}")
    reg = summary["stages"].get("register", {})
    if reg:
        lines += [
            f"Model: {reg['name']} version {reg['version']}, aliases: {', '.join(reg['aliases'])} ({reg['reason']})",
            f"Load it: mlflow.pyfunc.load_model('models:/{reg['name']}@{reg['aliases'][-1]}')",
        ]
    if mlflow_ui:
        lines.append(f"MLflow UI: {mlflow_ui}")
    log.debug("summary: %s", summary)
    return "\n".join(lines) + "\n"
