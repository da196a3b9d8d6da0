"""Stage 7, evaluate: score the new model on the test split, and the current champion on the same crops.

Writes ``metrics.json`` (top-1, top-k, per-class precision/recall/F1, macro-F1, confusion matrix, the test
set's fingerprint and the champion's scores), ``confusion_matrix.csv`` and ``summary.md``, and logs the
figures into the training run in MLflow.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field

from animl_retrain import tables, tracking
from animl_retrain.common import PipelineError, Report, log, read_json, write_json
from animl_retrain.config import StageConfig
from animl_retrain.data import CropDataset, decode_crops, make_loader
from animl_retrain.metrics import classification_report
from animl_retrain.models import load_checkpoint, model_from_checkpoint
from animl_retrain.stages.crop import CROPS_DIR
from animl_retrain.stages.split import test_fingerprint
from animl_retrain.stages.train import CHECKPOINT, pick_device, predict

METRICS_FILE = "metrics.json"


class EvaluateConfig(StageConfig):
    """Settings of the evaluate stage."""

    model: Path = Field(description="output folder of the train stage")
    crops: Path = Field(description="output folder of the crop stage")
    split: Path = Field(description="output folder of the split stage")
    out: Path = Field(description="output folder")
    registered_name: str = Field("", description="registered model whose 'champion' to score on the same test set")
    top_k: int = Field(3, ge=2, le=10, description="k of the top-k accuracy")
    batch_size: int = Field(64, ge=1, description="images per step")
    workers: int = Field(0, ge=0, description="data-loader workers")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")


class EvaluateResult(BaseModel):
    """What the evaluate stage produced."""

    top1: float
    macro_f1: float
    test_crops: int
    test_fingerprint: str
    champion: dict | None


def _score_champion(name: str, test: pd.DataFrame, crops_root: Path, labels: list[str], k: int) -> dict | None:
    """The champion's metrics on the same test crops, or None when there is no champion yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    frame = pd.DataFrame({"image": [(crops_root / c).read_bytes() for c in test["crop"]]})
    probs = model.predict(frame)
    # Score over our labels plus any the champion knows and we do not: predicting those counts as wrong.
    scored = labels + [c for c in probs.columns if c not in labels]
    probs = probs.reindex(columns=scored, fill_value=0.0).to_numpy()
    index = {label: i for i, label in enumerate(scored)}
    report = classification_report(test["label"].map(index).to_numpy(), probs, scored, k)
    return {"version": str(version.version), "run_id": version.run_id, **report}


def _markdown(report: dict, champion: dict | None, fingerprint: str, k: int) -> str:
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


def run(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate on the test split; write metrics, confusion matrix and summary; log them to MLflow."""
    import mlflow

    report = Report("evaluate")
    ckpt = load_checkpoint(Path(cfg.model) / CHECKPOINT)
    model, preprocessing, labels = model_from_checkpoint(ckpt)
    split = tables.read_table(Path(cfg.split) / "split.csv", tables.SPLIT)
    test = split[split["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise PipelineError("evaluate: the test split is empty; check the split stage's report")
    unknown = sorted(set(test["label"]) - set(labels))
    if unknown:
        raise PipelineError(f"evaluate: test labels {unknown} are not in the model's label index {labels}")
    index = {label: i for i, label in enumerate(labels)}
    crops_root = Path(cfg.crops) / CROPS_DIR
    device = pick_device(cfg.device)

    with tempfile.TemporaryDirectory(prefix="animl-eval-") as tmp:
        array = decode_crops([crops_root / c for c in test["crop"]], preprocessing.image_size, Path(tmp) / "test.npy")
        dataset = CropDataset(array, test["label"].map(index).to_numpy(), preprocessing.eval_transform())
        probs, targets = predict(
            model.to(device), make_loader(dataset, cfg.batch_size, cfg.workers), preprocessing, device
        )
    result = classification_report(targets, probs, labels, cfg.top_k)
    if not math.isfinite(result["macro_f1"]):
        raise PipelineError("evaluate: macro-F1 is not a number; refusing to publish an evaluation")
    fingerprint = test_fingerprint(split)
    tracking.check_server()
    champion = (
        _score_champion(cfg.registered_name, test, crops_root, labels, cfg.top_k) if cfg.registered_name else None
    )

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "status": "complete",
        "test_fingerprint": fingerprint,
        "model": result,
        "champion": champion,
        "top_k": cfg.top_k,
    }
    write_json(out / METRICS_FILE, metrics)
    pd.DataFrame(result["confusion_matrix"], index=labels, columns=labels).to_csv(out / "confusion_matrix.csv")
    summary = _markdown(result, champion, fingerprint, cfg.top_k)
    (out / "summary.md").write_text(summary)

    run_id = read_json(Path(cfg.model) / tracking.RUN_FILE, "MLflow run record")["run_id"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(
            {
                "test_top1": result["top1"],
                f"test_top{cfg.top_k}": result[f"top{cfg.top_k}"],
                "test_macro_f1": result["macro_f1"],
                "test_weighted_f1": result["weighted_f1"],
            }
            | {f"test_f1_{label}": m["f1"] for label, m in result["per_class"].items() if math.isfinite(m["f1"])}
        )
        mlflow.set_tag("test_fingerprint", fingerprint)
        mlflow.log_dict(metrics, "evaluation/metrics.json")
        mlflow.log_text(summary, "evaluation/summary.md")

    report.counts = {"test_crops": len(test)}
    report.details.update(
        top1=result["top1"],
        macro_f1=result["macro_f1"],
        test_fingerprint=fingerprint,
        champion_macro_f1=champion["macro_f1"] if champion else None,
    )
    report.finish(out)
    log.info(
        "evaluate: top-1 %.3f, macro-F1 %.3f on %d test crops%s",
        result["top1"],
        result["macro_f1"],
        len(test),
        f" (champion v{champion['version']}: {champion['macro_f1']:.3f})" if champion else "",
    )
    return EvaluateResult(
        top1=result["top1"],
        macro_f1=result["macro_f1"],
        test_crops=len(test),
        test_fingerprint=fingerprint,
        champion=champion and {k: champion[k] for k in ("version", "macro_f1", "top1")},
    )
