"""Stage 7, evaluate: score the new model on the test split, and the current champion on the same crops.

Writes ``metrics.json`` (top-1, top-k, per-class precision/recall/F1, macro-F1, confusion matrix, calibration,
operating points, the test set's fingerprint and the champion's scores), ``thresholds.json`` (the per-category
confidence thresholds deployment gives Animl: for every invasive class, the lowest threshold meeting the target
precision, chosen on the validation crops and then measured on test), ``confusion_matrix.csv``, ``summary.md``,
``report.html`` with its figures, and logs all of it into the training run in MLflow (thresholds also as tags).
Test metrics carry confidence intervals from resampling whole test locations, and the comparison with the
champion is paired on the same resampled locations, so a user can tell a real improvement from noise.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
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
from animl_retrain.modeling.metrics import bootstrap, calibration, classification_report, operating_points
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
    target_precision: float = Field(
        0.95, gt=0, le=1, description="precision each invasive class's threshold must meet (chosen on val)"
    )
    recall_floor: float = Field(
        0.0,
        ge=0,
        le=1,
        description="an invasive class's threshold may not push its val recall below this (0 = no floor); when "
        "the target precision cannot be met above it, the report says so",
    )
    bootstrap: int = Field(
        1000, ge=0, le=100_000, description="resamples of the test locations for confidence intervals (0 = none)"
    )
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
    comparison: dict | None = None


# Invasive recall on test below this (or below the recall floor) is called out in the report: most invaders missed.
LOW_RECALL = 0.5


def _units(test: pd.DataFrame) -> np.ndarray:
    """What the bootstrap resamples: the groups the split kept whole (locations, or sequences)."""
    groups = test["group"]
    return (groups if (groups != "").all() else test["location"]).to_numpy()


def _score_champion(cfg: EvaluateConfig, test: pd.DataFrame, crops_root: Path, labels: list[str], probs):
    """The champion's metrics on the same test crops and the paired comparison, or (None, None) without a champion.

    The comparison resamples the test locations and scores both models on each resample: the interval of the
    macro-F1 difference says whether this model is better beyond the noise of the test set ('better'), worse, or
    whether the two cannot be told apart ('tie').
    """
    version = registry.champion(cfg.registered_name)
    if version is None:
        return None, None
    model = registry.load_model(cfg.registered_name, version.version)
    frame = pd.DataFrame({"image": [(crops_root / c).read_bytes() for c in test["crop"]]})
    theirs = model.predict(frame)
    # Score over our labels plus any the champion knows and we do not: predicting those counts as wrong.
    scored = labels + [c for c in theirs.columns if c not in labels]
    theirs = theirs.reindex(columns=scored, fill_value=0.0).to_numpy()
    ours = np.pad(probs, ((0, 0), (0, len(scored) - len(labels))))
    y = test["label"].map({label: i for i, label in enumerate(scored)}).to_numpy()
    report = classification_report(y, theirs, scored, cfg.top_k)
    champion = {"version": version.version, "run_id": version.run_id, **report}
    if not cfg.bootstrap:
        return champion, None
    paired = bootstrap(_units(test), y, ours, theirs, cfg.bootstrap)
    champion["ci"] = bootstrap(_units(test), y, theirs, None, cfg.bootstrap)
    low, high = paired["difference"]["macro_f1"]
    verdict = "better" if low > 0 else "worse" if high < 0 else "tie"
    comparison = {
        "champion_version": version.version,
        "macro_f1_difference": classification_report(y, ours, scored, cfg.top_k)["macro_f1"] - report["macro_f1"],
        "interval": [low, high],
        "level": paired["level"],
        "verdict": verdict,
    }
    return champion, comparison


def _interval(ci: dict | None, key: str) -> str:
    if not ci or ci.get(key) is None or any(v is None or not math.isfinite(v) for v in ci[key]):
        return ""
    low, high = ci[key]
    return f" [{low:.3f}, {high:.3f}]"


def _markdown(metrics: dict, k: int) -> str:
    report, champion, comparison = metrics["model"], metrics["champion"], metrics["comparison"]
    calib, ops = metrics["calibration"], metrics["operating_points"]
    ci = report.get("ci")
    lines = [
        "# Test-set evaluation",
        "",
        f"{report['n']} crops, test-set fingerprint `{metrics['test_fingerprint']}`."
        + (
            f" Brackets: {ci['level']:.0%} intervals from {ci['resamples']} resamples of the {ci['groups']} test "
            "locations."
            if ci
            else ""
        ),
        "",
        f"| model | top-1 | top-{k} | macro-F1 |",
        "|---|---|---|---|",
        f"| this run | {report['top1']:.3f}{_interval(ci, 'top1')} | {report[f'top{k}']:.3f} | "
        f"{report['macro_f1']:.3f}{_interval(ci, 'macro_f1')} |",
    ]
    if champion:
        lines.append(
            f"| champion v{champion['version']} | {champion['top1']:.3f}{_interval(champion.get('ci'), 'top1')} | "
            f"{champion[f'top{k}']:.3f} | {champion['macro_f1']:.3f}{_interval(champion.get('ci'), 'macro_f1')} |"
        )
    if comparison:
        low, high = comparison["interval"]
        lines += [
            "",
            f"Against champion v{comparison['champion_version']}: macro-F1 difference "
            f"{comparison['macro_f1_difference']:+.3f}, {comparison['level']:.0%} interval [{low:+.3f}, {high:+.3f}] "
            f"(paired, same resampled locations): **{comparison['verdict']}**.",
        ]
    lines += [
        "",
        f"Calibration: ECE {calib['ece']:.3f} (top-1 confidence, {len(calib['bins'])} bins; temperature "
        f"{calib.get('temperature', 1.0):.3f} fitted on val and folded into the model).",
    ]
    if ops["invasive"]:
        floor = f", recall floor {ops['recall_floor']:.2f}" if ops["recall_floor"] else ""
        lines += [
            "",
            f"Operating points: thresholds chosen on val at target precision {ops['target_precision']:.2f}{floor}; "
            "precision and recall measured on test:",
            "",
            "| invasive class | threshold | test precision | test recall | missed | support | val precision | "
            "val recall | target met on val |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, p in ops["per_class"].items():
            v = p["chosen_on"]
            lines.append(
                f"| {label} | {p['threshold']:.3f} | {_fmt(p['precision'])} | {_fmt(p['recall'])} | {p['missed']} | "
                f"{p['support']} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {'yes' if p['met'] else 'NO'} |"
            )
        for label, p in ops["per_class"].items():
            if p["support"] and p["recall"] < max(LOW_RECALL, ops["recall_floor"]):
                lines += [
                    "",
                    f"**Warning:** {label}: {p['missed']} of {p['support']} invaders in the test set go "
                    f"unflagged at this threshold (recall {p['recall']:.3f}).",
                ]
        lines += [
            "",
            f"Native animals flagged as invasive at these thresholds: {_fmt(ops['native_flagged_rate'], 4)} "
            f"({ops['native_flagged']} of {ops['native_crops']}; top-1 alone: "
            f"{_fmt(ops['native_flagged_rate_top1'], 4)}).",
        ]
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, m in report["per_class"].items():
        lines.append(f"| {label} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | {m['support']} |")
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


def _fmt(value, digits: int = 3) -> str:
    """A number for a table; undefined (None, NaN) as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


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
        "recall_floor": ops["recall_floor"],
        "chosen_on": ops["chosen_on"],
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
        values |= {
            f"threshold_{label}": p["threshold"],
            f"test_precision_at_threshold_{label}": p["precision"],
            f"test_recall_at_threshold_{label}": p["recall"],
        }
    ci = result.get("ci") or {}
    for key in ("macro_f1", "top1"):
        if key in ci:
            values |= {f"test_{key}_ci_low": ci[key][0], f"test_{key}_ci_high": ci[key][1]}
    if metrics["comparison"]:
        values["test_macro_f1_minus_champion"] = metrics["comparison"]["macro_f1_difference"]
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
    """Evaluate on the test split (thresholds chosen on val); write metrics, thresholds, report; log to MLflow."""
    report = Report("evaluate")
    ckpt = load_checkpoint(Path(cfg.model) / layout.MODEL_FILE)
    model, preprocessing, labels = model_from_checkpoint(ckpt)
    split, val, test = _splits(cfg, labels)
    invasive = invasive_classes(cfg, labels, report)
    crops_root = Path(cfg.crops) / layout.CROPS_DIR
    (val_probs, val_y), (probs, targets) = _predict(cfg, (val, test), crops_root, model, preprocessing, labels)
    result, calib, ops = _score(cfg, (val_y, val_probs), (targets, probs), labels, invasive, report)
    if cfg.bootstrap:
        result["ci"] = bootstrap(_units(test), targets, probs, None, cfg.bootstrap)
    fingerprint = tables.test_fingerprint(split)
    tracking.check_server()
    champion, comparison = (
        _score_champion(cfg, test, crops_root, labels, probs) if cfg.registered_name else (None, None)
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    thresholds = thresholds_document(ops, labels, fingerprint)
    metrics = {
        "status": "complete",
        "test_fingerprint": fingerprint,
        "model": result,
        "calibration": calib | {"temperature": ckpt.get("temperature", 1.0)},
        "operating_points": ops,
        "champion": champion,
        "comparison": comparison,
        "top_k": cfg.top_k,
    }
    summary = _write_outputs(cfg, out, metrics, thresholds, labels)
    mistakes = worst_mistakes([crops_root / c for c in test["crop"]], targets, probs, labels, cfg.gallery)
    facts = {"model": ckpt["arch"], "input": f"{preprocessing.image_size} px", "test set": fingerprint}
    _write_report(cfg, out, result, calib, ops, mistakes, facts)
    run_id = read_json(Path(cfg.model) / layout.MLFLOW_RUN_FILE, "MLflow run record")["run_id"]
    _log_to_mlflow(run_id, cfg, out, result, calib, ops, thresholds, metrics, summary)
    return _finish(cfg, report, metrics, thresholds, len(test), len(invasive))


def _splits(cfg: EvaluateConfig, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The split table with its val and test rows; refuses an empty val or test set, or labels the model lacks."""
    split = tables.read_table(Path(cfg.split) / layout.SPLIT_TABLE, tables.SPLIT)
    parts = []
    for name in ("val", "test"):
        rows = split[split["split"] == name].reset_index(drop=True)
        if rows.empty:
            raise PipelineError(f"evaluate: the {name} split is empty; check the split stage's report")
        unknown = sorted(set(rows["label"]) - set(labels))
        if unknown:
            raise PipelineError(f"evaluate: {name} labels {unknown} are not in the model's label index {labels}")
        parts.append(rows)
    return split, parts[0], parts[1]


def _predict(cfg: EvaluateConfig, frames, crops_root: Path, model, preprocessing, labels):
    """``(probabilities, targets)`` of the model on each table of crops in ``frames``."""
    index = {label: i for i, label in enumerate(labels)}
    device = pick_device(cfg.device)
    model = model.to(device)
    out = []
    with tempfile.TemporaryDirectory(prefix="animl-eval-") as tmp:
        for i, frame in enumerate(frames):
            paths = [crops_root / c for c in frame["crop"]]
            array = decode_crops(paths, preprocessing.image_size, Path(tmp) / f"{i}.npy")
            dataset = CropDataset(array, frame["label"].map(index).to_numpy(), transforms.eval_transform(preprocessing))
            out.append(predict(model, make_loader(dataset, cfg.batch_size, cfg.workers), preprocessing, device))
    return out


def _score(cfg: EvaluateConfig, val, test, labels: list[str], invasive: list[str], report: Report):
    """Classification report and calibration on test, and the invasive thresholds: chosen on val, reported on test.

    A NaN macro-F1 stops here; a precision target not met, a recall floor that binds and a low test recall at the
    chosen threshold are reported.
    """
    (val_y, val_probs), (targets, probs) = val, test
    result = classification_report(targets, probs, labels, cfg.top_k)
    if not math.isfinite(result["macro_f1"]):
        raise PipelineError("evaluate: macro-F1 is not a number; refusing to publish an evaluation")
    calib = calibration(targets, probs, cfg.calibration_bins)
    ops = operating_points(
        val_y, val_probs, labels, invasive, cfg.target_precision, cfg.recall_floor, held_out=(targets, probs)
    )
    for label, p in ops["per_class"].items():
        on_val = p["chosen_on"]
        if p["floor_binding"]:
            report.problem(
                "target precision not met at the recall floor",
                label,
                f"precision {cfg.target_precision} is reached on val only below recall {cfg.recall_floor}; the "
                f"threshold keeps recall {on_val['recall']:.3f} at precision {on_val['precision']:.3f}",
            )
        elif not p["met"]:
            report.problem(
                "target precision not met",
                label,
                f"best precision {on_val['precision']:.3f} < {cfg.target_precision} on {on_val['support']} val crops",
            )
        if p["support"] and p["recall"] < max(LOW_RECALL, cfg.recall_floor):
            report.problem(
                "low invasive recall",
                label,
                f"at threshold {p['threshold']:.3f} the model flags {p['support'] - p['missed']} of {p['support']} "
                f"test crops of {label} (recall {p['recall']:.3f}): {p['missed']} invaders go unflagged; "
                "lower target_precision or set recall_floor",
            )
    return result, calib, ops


def _write_outputs(cfg: EvaluateConfig, out: Path, metrics: dict, thresholds: dict, labels: list[str]) -> str:
    """``metrics.json``, ``thresholds.json``, the confusion matrix and the summary; returns the summary."""
    result = metrics["model"]
    write_json(out / layout.METRICS_FILE, metrics)
    write_json(out / layout.THRESHOLDS_FILE, thresholds)
    pd.DataFrame(result["confusion_matrix"], index=labels, columns=labels).to_csv(out / layout.CONFUSION_FILE)
    summary = _markdown(metrics, cfg.top_k)
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
        invasive_test_recall={label: p["recall"] for label, p in ops["per_class"].items()},
        test_fingerprint=metrics["test_fingerprint"],
        champion_macro_f1=champion["macro_f1"] if champion else None,
        macro_f1_interval=(result.get("ci") or {}).get("macro_f1"),
        comparison=metrics["comparison"],
        temperature=calib.get("temperature"),
    )
    report.finish(cfg.out)
    log.info(
        "evaluate: top-1 %.3f, macro-F1 %.3f, ECE %.3f on %d test crops%s%s",
        result["top1"],
        result["macro_f1"],
        calib["ece"],
        n_test,
        f" (champion v{champion['version']}: {champion['macro_f1']:.3f})" if champion else "",
        f", {metrics['comparison']['verdict']}" if metrics["comparison"] else "",
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
        comparison=metrics["comparison"],
    )
