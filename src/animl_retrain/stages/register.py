"""Stage 8, register: put the model in the MLflow registry and decide whether it becomes the champion.

The model is logged as a pyfunc (see :mod:`animl_retrain.mlflow_model`) into the training run and registered
under ``name`` with tags (KFP run id, export fingerprint, validated-annotation fingerprint and count, where the
export is archived, label index, preprocessing, test-set fingerprint, test macro-F1, and the invasive classes'
confidence thresholds with the run artifact that explains them). It always gets the ``challenger`` alias;
``champion`` moves to it only when there is no champion or it beats the champion's macro-F1 on the same test set.
An evaluation that did not complete never moves it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pydantic import BaseModel, Field

from animl_retrain.config import StageConfig
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json, write_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout
from animl_retrain.integrations.mlflow import tracking

CHAMPION, CHALLENGER = "champion", "challenger"
COMPARED_TAG, DECISION_TAG = "champion_compared", "promotion"  # what this version was compared with, and the verdict


class RegisterConfig(StageConfig):
    """Settings of the register stage."""

    model: Path = Field(description="output folder of the train stage")
    evaluation: Path = Field(description="output folder of the evaluate stage")
    export: Path = Field(description="output folder of the export stage (for the export fingerprint)")
    out: Path = Field(description="output folder")
    # No quotes or backslashes: the name goes into MLflow registry search filters (see settle).
    name: str = Field(
        "animl-classifier", min_length=1, pattern=r"^[^'\"\\]+$", description="registered model name in MLflow"
    )
    kfp_run_id: str = Field("", description="Kubeflow run id, recorded as a tag")


class RegisterResult(BaseModel):
    """What the register stage did."""

    name: str
    version: str
    aliases: list[str]
    promoted: bool
    reason: str


def decide(evaluation: dict, current_champion) -> tuple[bool, str]:
    """Whether the challenger should become champion, and why.

    ``current_champion`` is the registry's champion version now (or None); the evaluation holds the scores of
    the champion it compared against. A champion that moved since then is compared through its tags.
    """
    ours = evaluation["model"]["macro_f1"]
    if current_champion is None:
        return True, "no champion yet"
    scored = evaluation.get("champion")
    if scored and scored["version"] == str(current_champion.version):
        theirs = scored["macro_f1"]
    elif current_champion.tags.get("test_fingerprint") == evaluation["test_fingerprint"]:
        theirs = float(current_champion.tags.get("test_macro_f1", "nan"))
    else:
        return False, (
            f"champion v{current_champion.version} was not scored on this test set; "
            "keeping it (re-run evaluation to compare)"
        )
    if math.isfinite(theirs) and ours <= theirs:
        return False, f"macro-F1 {ours:.4f} does not beat champion v{current_champion.version}'s {theirs:.4f}"
    return True, f"macro-F1 {ours:.4f} beats champion v{current_champion.version}'s {theirs:.4f}"


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def settle(client, name: str, version: str, rounds: int = 3, pause: float = 0.5) -> str:
    """After ``version`` took the champion alias: undo a lost race with a concurrent registration; return the champion.

    Two runs finishing together can both read the same champion, both beat it, and both move the alias: the last
    to move it wins, even when it is the worse model. So every run that promotes looks again: among the versions
    that were compared with the same champion on the same test set and decided to promote (tags
    ``champion_compared``, ``test_fingerprint``, ``promotion``, all set before the alias moved), the best test
    macro-F1 (the earliest version on a tie) gets the alias. Whichever run moved the alias last settles last and
    sees all of them. A champion that has left the group since (a later run, or a person) is left alone.
    """
    mine = client.get_model_version(name, version)
    group = {key: mine.tags.get(key, "") for key in (COMPARED_TAG, "test_fingerprint")}
    query = " and ".join(
        [f"name='{name}'", f"tags.{DECISION_TAG}='promoted'"]
        + [f"tags.{key}='{value}'" for key, value in group.items()]
    )
    champion = str(version)
    for attempt in range(rounds):
        current = _champion(client, name)
        if current is None:
            return champion
        contenders = {str(v.version): v for v in client.search_model_versions(query)}
        if str(current.version) not in contenders:
            return str(current.version)
        best = max(contenders.values(), key=lambda v: (_score(v), -int(v.version)))
        champion = str(best.version)
        if champion != str(current.version):
            log.warning(
                "register: concurrent registrations: champion v%s -> v%s (better on the same test set)",
                current.version,
                champion,
            )
            client.set_registered_model_alias(name, CHAMPION, champion)
        elif attempt:
            return champion
        time.sleep(pause)
    return champion


def _score(version) -> float:
    value = float(version.tags.get("test_macro_f1", "nan"))
    return value if math.isfinite(value) else -1.0


def run(cfg: RegisterConfig) -> RegisterResult:
    """Log, register and alias the model; write ``registration.json``."""
    import mlflow

    from animl_retrain.integrations.mlflow.pyfunc import log_model

    report = Report("register")
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
    tracking.check_server()

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
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({k: v for k, v in tags.items() if k not in ("label_index", "preprocessing")})
        info = log_model(Path(cfg.model) / layout.MODEL_FILE)
    client = mlflow.MlflowClient()
    version = mlflow.register_model(info.model_uri, cfg.name, tags=tags)
    client.set_registered_model_alias(cfg.name, CHALLENGER, version.version)
    current = _champion(client, cfg.name)
    promoted, reason = decide(evaluation, current)
    # Recorded before the alias moves, so that a registration racing this one sees it when it settles.
    client.set_model_version_tag(cfg.name, version.version, COMPARED_TAG, current.version if current else "none")
    client.set_model_version_tag(cfg.name, version.version, DECISION_TAG, "promoted" if promoted else "kept")
    if promoted:
        client.set_registered_model_alias(cfg.name, CHAMPION, version.version)
        settled = settle(client, cfg.name, version.version)
        if settled != str(version.version):
            promoted, reason = False, f"{reason}, but concurrent registration v{settled} beats it on the same test set"
    aliases = [CHALLENGER] + ([CHAMPION] if promoted else [])

    result = RegisterResult(
        name=cfg.name, version=str(version.version), aliases=aliases, promoted=promoted, reason=reason
    )
    model_uri = f"models:/{cfg.name}/{version.version}"
    write_json(Path(cfg.out) / layout.REGISTRATION_FILE, result.model_dump() | {"model_uri": model_uri})
    (Path(cfg.out) / layout.REGISTRATION_SUMMARY_FILE).write_text(
        f"# Registered `{cfg.name}` version {version.version}\n\nAliases: {', '.join(aliases)}. {reason}.\n\n"
        f'Load it with `mlflow.pyfunc.load_model("models:/{cfg.name}@{aliases[-1]}")`.\n'
    )
    report.counts = {"version": int(version.version), "promoted": int(promoted)}
    report.details.update(result.model_dump())
    report.finish(cfg.out)
    log.info("register: %s version %s (%s): %s", cfg.name, version.version, ", ".join(aliases), reason)
    return result
