"""Stage 8, register: put the model in the MLflow registry and decide whether it becomes the champion.

The model is logged as a pyfunc (:mod:`animl_retrain.integrations.mlflow.pyfunc`) into the training run and registered
under ``name`` with tags (KFP run id, export fingerprint, validated-annotation fingerprint and count, where the
export is archived, label index, preprocessing, test-set fingerprint, test macro-F1, and the invasive classes'
confidence thresholds with the run artifact that explains them). It always gets the ``challenger`` alias;
``champion`` moves to it only when there is no champion or it beats the champion's macro-F1 on the same test set
beyond the noise of that test set (the paired interval over resampled test locations lies above zero; a tie keeps
the champion).
An evaluation that did not complete never moves it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, Field

from animl_retrain.config import MODEL_NAME, StageConfig
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json, write_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout
from animl_retrain.integrations.mlflow import registry, tracking


class RegisterConfig(StageConfig):
    """Settings of the register stage."""

    model: Path = Field(description="output folder of the train stage")
    evaluation: Path = Field(description="output folder of the evaluate stage")
    export: Path = Field(description="output folder of the export stage (for the export fingerprint)")
    out: Path = Field(description="output folder")
    # No quotes or backslashes: the name goes into MLflow registry search filters (see settle).
    name: str = Field(MODEL_NAME, min_length=1, pattern=r"^[^'\"\\]+$", description="registered model name in MLflow")
    kfp_run_id: str = Field("", description="Kubeflow run id, recorded as a tag")


class RegisterResult(BaseModel):
    """What the register stage did."""

    name: str
    version: str
    aliases: list[str]
    promoted: bool
    reason: str


def decide(evaluation: dict, current_champion) -> tuple[bool, str]:
    """Whether the challenger should become champion, and why: only when it is better beyond the test set's noise.

    ``current_champion`` is the registry's champion now (:func:`registry.champion`, or None); the evaluation holds
    the champion it scored on the same test crops and, when it resampled the test locations, the paired interval
    of the macro-F1 difference: the challenger is promoted when the whole interval lies above zero, and a tie
    (an interval around zero) keeps the champion. A champion that moved since the evaluation is compared through
    its tags: the challenger's interval must then lie above the champion's macro-F1.
    """
    ours = evaluation["model"]["macro_f1"]
    if current_champion is None:
        return True, "no champion yet"
    version = f"champion v{current_champion.version}"
    scored, comparison = evaluation.get("champion"), evaluation.get("comparison")
    if scored and scored["version"] == str(current_champion.version):
        theirs = scored["macro_f1"]
        if comparison and comparison.get("champion_version") == scored["version"]:
            low, high = comparison["interval"]
            span = f"macro-F1 {ours:.4f} vs {theirs:.4f}, {comparison['level']:.0%} interval of the difference "
            span += f"[{low:+.4f}, {high:+.4f}]"
            if comparison["verdict"] == "better":
                return True, f"{span}: better than {version} beyond the noise of the test set"
            if comparison["verdict"] == "tie":
                return False, f"{span}: a tie with {version} within the noise of the test set; keeping the champion"
            return False, f"{span}: worse than {version}"
    elif current_champion.tags.get("test_fingerprint") == evaluation["test_fingerprint"]:
        theirs = float(current_champion.tags.get("test_macro_f1", "nan"))
        low = ((evaluation["model"].get("ci") or {}).get("macro_f1") or [None])[0]
        if low is not None and math.isfinite(theirs):
            if low > theirs:
                return True, f"macro-F1 {ours:.4f} (interval from {low:.4f}) beats {version}'s {theirs:.4f}"
            return False, f"macro-F1 {ours:.4f} (interval from {low:.4f}) does not clear {version}'s {theirs:.4f}"
    else:
        return False, f"{version} was not scored on this test set; keeping it (re-run evaluation to compare)"
    if math.isfinite(theirs) and ours <= theirs:
        return False, f"macro-F1 {ours:.4f} does not beat {version}'s {theirs:.4f}"
    return True, f"macro-F1 {ours:.4f} beats {version}'s {theirs:.4f}"


def _read_inputs(cfg: RegisterConfig) -> tuple[dict, str, dict[str, str]]:
    """The completed evaluation, the training run id and the tags the version gets; refuses an unfinished one."""
    evaluation = read_json(Path(cfg.evaluation) / layout.METRICS_FILE, "evaluation metrics")
    macro_f1 = (evaluation.get("model") or {}).get("macro_f1")
    if evaluation.get("status") != "complete" or not isinstance(macro_f1, float) or not math.isfinite(macro_f1):
        raise PipelineError(
            "register: the evaluation did not complete; nothing is registered and champion is untouched"
        )
    run_id = read_json(Path(cfg.model) / layout.MLFLOW_RUN_FILE, "MLflow run record")["run_id"]
    export_report = read_json(Path(cfg.export) / layout.STAGE_REPORT_FILE, "export report")
    label_index = read_json(Path(cfg.model) / layout.LABEL_INDEX_FILE, "label index")
    preprocessing = read_json(Path(cfg.model) / layout.PREPROCESSING_FILE, "preprocessing")
    thresholds_file = Path(cfg.evaluation) / layout.THRESHOLDS_FILE
    thresholds = read_json(thresholds_file, "thresholds") if thresholds_file.is_file() else None
    tags = {
        "kfp_run_id": cfg.kfp_run_id,
        "mlflow_run_id": run_id,
        "export_fingerprint": export_report.get("fingerprint", ""),
        "validated_fingerprint": export_report.get("validated_fingerprint", ""),
        "validated_annotations": str(export_report.get("validated_annotations", "")),
        "export_archive": export_report.get("archive_uri", ""),
        "test_fingerprint": evaluation["test_fingerprint"],
        "test_macro_f1": f"{macro_f1:.6f}",
        "test_top1": f"{evaluation['model']['top1']:.6f}",
        "label_index": json.dumps(label_index),
        "preprocessing": json.dumps(preprocessing),
    }
    if thresholds is not None:
        tags |= {
            "invasive_thresholds": json.dumps(thresholds["thresholds"]),
            "target_precision": str(thresholds["target_precision"]),
            "thresholds_artifact": f"runs:/{run_id}/evaluation/{layout.THRESHOLDS_FILE}",
        }
    return evaluation, run_id, tags


def _write_outputs(cfg: RegisterConfig, result: RegisterResult, report: Report) -> None:
    """``registration.json``, the summary the UI shows, and the report."""
    model_uri = f"models:/{cfg.name}/{result.version}"
    write_json(Path(cfg.out) / layout.REGISTRATION_FILE, result.model_dump() | {"model_uri": model_uri})
    (Path(cfg.out) / layout.REGISTRATION_SUMMARY_FILE).write_text(
        f"# Registered `{cfg.name}` version {result.version}\n\nAliases: {', '.join(result.aliases)}. "
        f"{result.reason}.\n\n"
        f'Load it with `mlflow.pyfunc.load_model("models:/{cfg.name}@{result.aliases[-1]}")`.\n'
    )
    report.counts = {"version": int(result.version), "promoted": int(result.promoted)}
    report.details.update(result.model_dump())
    report.finish(cfg.out)


def run(cfg: RegisterConfig) -> RegisterResult:
    """Log, register and alias the model; write ``registration.json``."""
    report = Report("register")
    evaluation, run_id, tags = _read_inputs(cfg)
    tracking.check_server()
    version = registry.register(cfg.name, run_id, Path(cfg.model) / layout.MODEL_FILE, tags)
    current = registry.champion(cfg.name)
    promoted, reason = decide(evaluation, current)
    # Recorded before the alias moves, so that a registration racing this one sees it when it settles.
    registry.record_decision(cfg.name, version, current, promoted)
    if promoted:
        settled = registry.promote(cfg.name, version)
        if settled != version:
            promoted, reason = False, f"{reason}, but concurrent registration v{settled} beats it on the same test set"
    aliases = [registry.CHALLENGER] + ([registry.CHAMPION] if promoted else [])
    result = RegisterResult(name=cfg.name, version=version, aliases=aliases, promoted=promoted, reason=reason)
    _write_outputs(cfg, result, report)
    log.info("register: %s version %s (%s): %s", cfg.name, version, ", ".join(aliases), reason)
    return result
