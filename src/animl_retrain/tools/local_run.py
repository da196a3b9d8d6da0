"""Run the Kubeflow pipeline on this machine with ``kfp.local`` and summarise what every stage did.

The very pipeline that is compiled for Kubernetes runs here through kfp's SubprocessRunner: each component
executes in a subprocess of this virtualenv, artifacts live under a local pipeline root, and the S3 and MLflow
endpoints come from the environment exactly as they do from Secrets on a cluster.

**The ``python3`` substitution.** Before it starts a task, the SubprocessRunner (kfp 2.17,
``kfp/local/subprocess_task_handler.py``: ``replace_python_executable``) replaces the substring ``python3`` in
every element of the task's command line with the interpreter's path (``sys.executable`` here, where
``use_venv=False``), sparing only the element that holds the component's source. Parameter values and artifact
paths travel in another element, the ``--executor_input`` JSON, so a weights file under
``.../lib/python3.11/site-packages/`` reaches the component as ``.../lib/<interpreter path>.11/site-packages/``.
:func:`protect_parameters` links every local file or folder whose path contains ``python3`` into the pipeline
root under a neutral name before the run, and refuses any other value containing it, and a pipeline root whose
path does, with an error that says so.
"""

from __future__ import annotations

import hashlib
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


KFP_REWRITTEN = "python3"  # what kfp.local's SubprocessRunner replaces anywhere in a task's command line
LINKS_DIR = "inputs"  # under the pipeline root: neutral names for local paths that contain KFP_REWRITTEN


def protect_parameters(params: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """The parameters, with each local path containing ``python3`` replaced by a link under a neutral name.

    Any other value containing ``python3`` (an ``s3://`` URI, inline JSON, a path that does not exist) cannot be
    passed through kfp.local intact and is refused, as is a pipeline root whose path contains it.
    """
    if KFP_REWRITTEN in str(pipeline_root):
        raise PipelineError(
            f"the local pipeline root {pipeline_root} contains {KFP_REWRITTEN!r}, which kfp.local rewrites in every "
            "artifact path; choose another folder (--pipeline-root, or ANIML_STATE_DIR)"
        )
    protected = dict(params)
    for name, value in params.items():
        if not isinstance(value, str) or KFP_REWRITTEN not in value:
            continue
        path = Path(value).expanduser()
        if "://" in value or not path.exists():
            raise PipelineError(
                f"parameter {name}={value!r} contains {KFP_REWRITTEN!r}: kfp.local's SubprocessRunner replaces it "
                "with the interpreter's path anywhere in a task's command line, parameter values included; only an "
                "existing local file or folder can be passed intact (it is linked under a neutral name); rename "
                "or move it, or run on Kubeflow"
            )
        protected[name] = str(_neutral_link(path.resolve(), Path(pipeline_root) / LINKS_DIR, name))
        log.info(
            "run: %s passed as %s (kfp.local rewrites %r in parameter values)", value, protected[name], KFP_REWRITTEN
        )
    return protected


def _neutral_link(target: Path, folder: Path, name: str) -> Path:
    """A symbolic link to ``target`` in ``folder`` whose path lacks ``python3``, the same for the same target."""
    suffix = "".join(target.suffixes[-2:])
    suffix = "" if KFP_REWRITTEN in suffix else suffix
    link = folder / f"{name}-{hashlib.sha256(str(target).encode()).hexdigest()[:12]}{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() == target:
        return link
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())
    return link


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


def run_local(params: dict[str, Any], pipeline_root: Path, runner: Any = None) -> dict[str, Any]:
    """Run the pipeline locally; return the summary built from every stage's report.

    ``runner`` is kfp.local's runner: by default the SubprocessRunner in this virtualenv; a
    ``kfp.local.DockerRunner`` runs every task in the project's images instead (``make test-images``).
    """
    import kfp.local

    from animl_retrain.pipelines.retrain import PIPELINE_NAME, retrain_pipeline
    from animl_retrain.tools.kubeflow import normalise_gpus

    _check_params(params)
    params = normalise_gpus(params)  # the pipeline takes train_gpus as a string; a YAML 1 is fine
    pipeline_root = Path(pipeline_root).resolve()
    params = protect_parameters(params, pipeline_root)
    pipeline_root.mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=runner or kfp.local.SubprocessRunner(use_venv=False),
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


def split_line(report: dict[str, Any]) -> str:
    """One line on the split: grouping, groups per split, classes missing from a split, distance from the targets."""
    grouping, groups = report["grouping"], report["locations"]
    unit = "locations" if grouping["by"] == "location" else "sequences"
    missing = report.get("missing", [])
    placed = (
        "every class in every split"
        if not missing
        else f"{len(missing)} class(es) missing from a split ("
        + ", ".join(f"{m['class']} in {m['split']}" for m in missing[:4])
        + (", ..." if len(missing) > 4 else "")
        + ")"
    )
    return (
        f"Split by {grouping['by']}: {'/'.join(str(groups[s]) for s in ('train', 'val', 'test'))} {unit} in "
        f"train/val/test; {placed}; share distance from the targets {report['distance']:.3f} "
        f"({report.get('method', 'random')} search)"
    )


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
    split = summary["stages"].get("split", {})
    if split.get("grouping"):
        lines += ["", split_line(split)]
    export = summary["stages"].get("export", {})
    if export.get("decision") == "skip":
        lines += ["", f"Training skipped: {export.get('decision_reason', '')}"]
    ev = summary["stages"].get("evaluate", {})
    if ev:
        interval = ev.get("macro_f1_interval")
        lines += [
            "",
            f"Test set: top-1 {ev['top1']:.3f}, macro-F1 {ev['macro_f1']:.3f}"
            + (f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")
            + f" on {ev['counts']['test_crops']} crops",
        ]
        if ev.get("thresholds"):
            recall = ev.get("invasive_test_recall") or {}
            shown = ", ".join(
                f"{label} >= {t:.2f}" + (f" (test recall {recall[label]:.2f})" if recall.get(label) is not None else "")
                for label, t in ev["thresholds"].items()
            )
            rate = ev.get("native_flagged_rate")
            lines.append(
                f"Invasive thresholds: {shown}; natives flagged invasive: "
                + ("n/a" if rate is None else f"{100 * rate:.1f}%")
                + f" (report: {summary['run_dir']}/evaluate-op/evaluation/report.html)"
            )
        if ev.get("champion_macro_f1") is not None:
            verdict = (ev.get("comparison") or {}).get("verdict")
            lines.append(
                f"Previous champion on the same test set: macro-F1 {ev['champion_macro_f1']:.3f}"
                + (f" ({verdict}, paired over resampled test locations)" if verdict else "")
            )
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
