"""Stage 7, evaluate: score the new model on the test split, and the current champion on the same crops.

Writes ``metrics.json`` (top-1, top-k, per-class precision/recall/F1, macro-F1, confusion matrix, calibration,
operating points, the test set's fingerprint and the champion's scores), ``thresholds.json`` (the per-category
confidence thresholds deployment gives Animl: for every invasive class, the lowest threshold meeting the target
precision), ``confusion_matrix.csv``, ``summary.md``, ``report.html`` with its figures, and logs all of it into
the training run in MLflow (thresholds also as tags).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field

from animl_retrain.config import StageConfig
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json, write_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout, tables
from animl_retrain.integrations.mlflow import registry, tracking
from animl_retrain.modeling import transforms
from animl_retrain.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from animl_retrain.modeling.data import CropDataset, decode_crops, make_loader
from animl_retrain.modeling.inference import pick_device, predict
from animl_retrain.modeling.metrics import calibration, classification_report, operating_points
from animl_retrain.modeling.report import worst_mistakes

THRESHOLDS_FORMAT = "animl-retrain-thresholds/1"


class EvaluateConfig(StageConfig):
    """Settings of the evaluate stage."""

    model: Path = Field(description="output folder of the train stage")
    crops: Path = Field(description="output folder of the crop stage")
    split: Path = Field(description="output folder of the split stage")
    out: Path = Field(description="output folder")
    export: Path | None = Field(None, description="output folder of the export stage (its label spec marks invasives)")
    registered_name: str = Field("", description="registered model whose 'champion' to score on the same test set")
    target_precision: float = Field(0.95, gt=0, le=1, description="precision each invasive class's threshold must meet")
    top_k: int = Field(3, ge=2, le=10, description="k of the top-k accuracy")
    calibration_bins: int = Field(15, ge=2, le=100, description="bins of the reliability diagram and ECE")
    gallery: int = Field(24, ge=0, le=500, description="most confident mistakes shown in the report")
    batch_size: int = Field(64, ge=1, description="images per step")
    workers: int = Field(0, ge=0, description="data-loader workers")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")


class EvaluateResult(BaseModel):
    """What the evaluate stage produced."""

    top1: float
    macro_f1: float
    ece: float
    thresholds: dict[str, float]
    native_flagged_rate: float | None
    test_crops: int
    test_fingerprint: str
    champion: dict | None


def _score_champion(name: str, test: pd.DataFrame, crops_root: Path, labels: list[str], k: int) -> dict | None:
    """The champion's metrics on the same test crops, or None when there is no champion yet."""
    version = registry.champion(name)
    if version is None:
        return None
    model = registry.load_model(name, version.version)
    frame = pd.DataFrame({"image": [(crops_root / c).read_bytes() for c in test["crop"]]})
    probs = model.predict(frame)
    # Score over our labels plus any the champion knows and we do not: predicting those counts as wrong.
    scored = labels + [c for c in probs.columns if c not in labels]
    probs = probs.reindex(columns=scored, fill_value=0.0).to_numpy()
    index = {label: i for i, label in enumerate(scored)}
    report = classification_report(test["label"].map(index).to_numpy(), probs, scored, k)
    return {"version": version.version, "run_id": version.run_id, **report}


def _markdown(report: dict, champion: dict | None, fingerprint: str, k: int, calib: dict, ops: dict) -> str:
    lines = [
        "# Test-set evaluation",
        "",
        f"{report['n']} crops, test-set fingerprint `{fingerprint}`.",
        "",
        f"| model | top-1 | top-{k} | macro-F1 |",
        "|---|---|---|---|",
        f"| this run | {report['top1']:.3f} | {report[f'top{k}']:.3f} | {report['macro_f1']:.3f} |",
    ]
    if champion:
        lines.append(
            f"| champion v{champion['version']} | {champion['top1']:.3f} | {champion[f'top{k}']:.3f} | "
            f"{champion['macro_f1']:.3f} |"
        )
    lines += ["", f"Calibration: ECE {calib['ece']:.3f} (top-1 confidence, {len(calib['bins'])} bins)."]
    if ops["invasive"]:
        lines += [
            "",
            f"Operating points at target precision {ops['target_precision']:.2f}:",
            "",
            "| invasive class | threshold | precision | recall | support | target met |",
            "|---|---|---|---|---|---|",
        ]
        for label, p in ops["per_class"].items():
            lines.append(
                f"| {label} | {p['threshold']:.3f} | {p['precision']:.3f} | {p['recall']:.3f} | {p['support']} | "
                f"{'yes' if p['met'] else 'NO'} |"
            )
        lines += [
            "",
            f"Native animals flagged as invasive at these thresholds: {ops['native_flagged_rate']:.4f} "
            f"({ops['native_flagged']} of {ops['native_crops']}; top-1 alone: {ops['native_flagged_rate_top1']:.4f}).",
        ]
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, m in report["per_class"].items():
        lines.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    labels = report["labels"]
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for label, row in zip(labels, report["confusion_matrix"], strict=True):
        lines.append(f"| **{label}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def invasive_classes(cfg: EvaluateConfig, labels: list[str], report: Report) -> list[str]:
    """Classes the export's label spec marks invasive, among the model's labels."""
    if cfg.export is None:
        return []
    spec = read_json(Path(cfg.export) / layout.LABEL_SPEC_FILE, "label spec of the export stage")
    marked = sorted(label for label, entry in spec.items() if isinstance(entry, dict) and entry.get("invasive"))
    for label in sorted(set(marked) - set(labels)):
        report.problem("invasive class not in the model", label, "the split dropped it (too few locations?)")
    return [label for label in marked if label in labels]


def thresholds_document(ops: dict, labels: list[str], fingerprint: str) -> dict:
    """``thresholds.json``: the per-category thresholds that travel with the model (see docs/data-contracts.md)."""
    return {
        "format": THRESHOLDS_FORMAT,
        "rule": "apply an invasive label when it is the top-1 prediction and its confidence >= its threshold",
        "target_precision": ops["target_precision"],
        "test_fingerprint": fingerprint,
        "labels": labels,
        "invasive": ops["invasive"],
        "thresholds": {label: p["threshold"] for label, p in ops["per_class"].items()},
        "per_class": ops["per_class"],
        "native_crops": ops["native_crops"],
        "native_flagged": ops["native_flagged"],
        "native_flagged_rate": ops["native_flagged_rate"],
        "native_flagged_rate_top1": ops["native_flagged_rate_top1"],
    }


def _predict_test(cfg: EvaluateConfig, test: pd.DataFrame, crops_root: Path, model, preprocessing, labels):
    index = {label: i for i, label in enumerate(labels)}
    device = pick_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="animl-eval-") as tmp:
        array = decode_crops([crops_root / c for c in test["crop"]], preprocessing.image_size, Path(tmp) / "test.npy")
        dataset = CropDataset(array, test["label"].map(index).to_numpy(), transforms.eval_transform(preprocessing))
        return predict(model.to(device), make_loader(dataset, cfg.batch_size, cfg.workers), preprocessing, device)


def _write_report(cfg, out: Path, result, calib, ops, mistakes, facts) -> None:
    from animl_retrain.modeling import report as er

    figures = {
        "confusion": er.confusion_png(result),
        "per_class": er.per_class_png(result),
        "reliability": er.reliability_png(calib),
    }
    for name, png in figures.items():
        (out / er.PNG_FILES[name]).write_bytes(png)
    page = er.render("Test-set evaluation", result, calib, ops, mistakes, figures, facts)
    (out / layout.HTML_REPORT_FILE).write_text(page)


def _log_to_mlflow(run_id: str, cfg, out: Path, result, calib, ops, thresholds, metrics, summary) -> None:
    from animl_retrain.modeling.report import PNG_FILES

    k = cfg.top_k
    values = {
        "test_top1": result["top1"],
        f"test_top{k}": result[f"top{k}"],
        "test_macro_f1": result["macro_f1"],
        "test_weighted_f1": result["weighted_f1"],
        "test_ece": calib["ece"],
        "test_native_flagged_rate": ops["native_flagged_rate"],
    }
    values |= {f"test_f1_{label}": m["f1"] for label, m in result["per_class"].items()}
    for label, p in ops["per_class"].items():
        values |= {f"test_threshold_{label}": p["threshold"], f"test_recall_at_target_{label}": p["recall"]}
    tracking.log_to_run(
        run_id,
        metrics=values,
        tags={
            "test_fingerprint": thresholds["test_fingerprint"],
            "target_precision": str(cfg.target_precision),
            "invasive_thresholds": json.dumps(thresholds["thresholds"]),
        },
        dicts={"evaluation/metrics.json": metrics, f"evaluation/{layout.THRESHOLDS_FILE}": thresholds},
        texts={"evaluation/summary.md": summary},
        artifacts=("evaluation", [out / name for name in [layout.HTML_REPORT_FILE, *PNG_FILES.values()]]),
    )


def run(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate on the test split; write metrics, thresholds, report and summary; log them to MLflow."""
    report = Report("evaluate")
    ckpt = load_checkpoint(Path(cfg.model) / layout.MODEL_FILE)
    model, preprocessing, labels = model_from_checkpoint(ckpt)
    split, test = _test_split(cfg, labels)
    invasive = invasive_classes(cfg, labels, report)
    crops_root = Path(cfg.crops) / layout.CROPS_DIR
    probs, targets = _predict_test(cfg, test, crops_root, model, preprocessing, labels)
    result, calib, ops = _score(cfg, targets, probs, labels, invasive, report)
    fingerprint = tables.test_fingerprint(split)
    tracking.check_server()
    champion = (
        _score_champion(cfg.registered_name, test, crops_root, labels, cfg.top_k) if cfg.registered_name else None
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    thresholds = thresholds_document(ops, labels, fingerprint)
    metrics = {
        "status": "complete",
        "test_fingerprint": fingerprint,
        "model": result,
        "calibration": calib,
        "operating_points": ops,
        "champion": champion,
        "top_k": cfg.top_k,
    }
    summary = _write_outputs(cfg, out, metrics, thresholds, labels)
    mistakes = worst_mistakes([crops_root / c for c in test["crop"]], targets, probs, labels, cfg.gallery)
    facts = {"model": ckpt["arch"], "input": f"{preprocessing.image_size} px", "test set": fingerprint}
    _write_report(cfg, out, result, calib, ops, mistakes, facts)
    run_id = read_json(Path(cfg.model) / layout.MLFLOW_RUN_FILE, "MLflow run record")["run_id"]
    _log_to_mlflow(run_id, cfg, out, result, calib, ops, thresholds, metrics, summary)
    return _finish(cfg, report, metrics, thresholds, len(test), len(invasive))


def _test_split(cfg: EvaluateConfig, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The split table and its test rows; refuses an empty test set or labels the model does not know."""
    split = tables.read_table(Path(cfg.split) / layout.SPLIT_TABLE, tables.SPLIT)
    test = split[split["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise PipelineError("evaluate: the test split is empty; check the split stage's report")
    unknown = sorted(set(test["label"]) - set(labels))
    if unknown:
        raise PipelineError(f"evaluate: test labels {unknown} are not in the model's label index {labels}")
    return split, test


def _score(cfg: EvaluateConfig, targets, probs, labels: list[str], invasive: list[str], report: Report):
    """Classification report, calibration and the invasive classes' operating points; a NaN macro-F1 stops here."""
    result = classification_report(targets, probs, labels, cfg.top_k)
    if not math.isfinite(result["macro_f1"]):
        raise PipelineError("evaluate: macro-F1 is not a number; refusing to publish an evaluation")
    calib = calibration(targets, probs, cfg.calibration_bins)
    ops = operating_points(targets, probs, labels, invasive, cfg.target_precision)
    for label, p in ops["per_class"].items():
        if not p["met"]:
            report.problem(
                "target precision not met",
                label,
                f"best precision {p['precision']:.3f} < {cfg.target_precision} on {p['support']} test crops",
            )
    return result, calib, ops


def _write_outputs(cfg: EvaluateConfig, out: Path, metrics: dict, thresholds: dict, labels: list[str]) -> str:
    """``metrics.json``, ``thresholds.json``, the confusion matrix and the summary; returns the summary."""
    result = metrics["model"]
    write_json(out / layout.METRICS_FILE, metrics)
    write_json(out / layout.THRESHOLDS_FILE, thresholds)
    pd.DataFrame(result["confusion_matrix"], index=labels, columns=labels).to_csv(out / layout.CONFUSION_FILE)
    calib, ops = metrics["calibration"], metrics["operating_points"]
    summary = _markdown(result, metrics["champion"], metrics["test_fingerprint"], cfg.top_k, calib, ops)
    (out / layout.SUMMARY_FILE).write_text(summary)
    return summary


def _finish(cfg: EvaluateConfig, report: Report, metrics: dict, thresholds: dict, n_test: int, n_invasive: int):
    """The report, a log line and the result."""
    result, calib, ops, champion = (
        metrics["model"],
        metrics["calibration"],
        metrics["operating_points"],
        metrics["champion"],
    )
    report.counts = {"test_crops": n_test, "invasive_classes": n_invasive}
    report.details.update(
        top1=result["top1"],
        macro_f1=result["macro_f1"],
        ece=calib["ece"],
        thresholds=thresholds["thresholds"],
        native_flagged_rate=ops["native_flagged_rate"],
        test_fingerprint=metrics["test_fingerprint"],
        champion_macro_f1=champion["macro_f1"] if champion else None,
    )
    report.finish(cfg.out)
    log.info(
        "evaluate: top-1 %.3f, macro-F1 %.3f, ECE %.3f on %d test crops%s",
        result["top1"],
        result["macro_f1"],
        calib["ece"],
        n_test,
        f" (champion v{champion['version']}: {champion['macro_f1']:.3f})" if champion else "",
    )
    rate = ops["native_flagged_rate"]
    return EvaluateResult(
        top1=result["top1"],
        macro_f1=result["macro_f1"],
        ece=calib["ece"],
        thresholds=thresholds["thresholds"],
        native_flagged_rate=rate if math.isfinite(rate) else None,
        test_crops=n_test,
        test_fingerprint=metrics["test_fingerprint"],
        champion=champion and {k: champion[k] for k in ("version", "macro_f1", "top1")},
    )
