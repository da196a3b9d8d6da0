"""KFP component: test-set metrics, confusion matrix and a summary, for the UI and MLflow."""

from animl_retrain.components.container_images import ML_IMAGE
from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output


@dsl.component(base_image=ML_IMAGE, install_kfp_package=False)
def evaluate_op(
    model: Input[Model],
    crops: Input[Dataset],
    split: Input[Dataset],
    export: Input[Dataset],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    summary: Output[Markdown],
    report: Output[HTML],
    registered_name: str = "",
    target_precision: float = 0.95,
    recall_floor: float = 0.0,
):
    """Score the model (and the current champion) on the test split; invasive thresholds chosen on val."""
    import json
    import shutil
    from pathlib import Path

    from animl_retrain.components.runtime import run_stage

    from animl_retrain.formats import layout
    from animl_retrain.stages import evaluate as stage

    run_stage(
        stage.run,
        stage.EvaluateConfig,
        evaluation,
        model=model.path,
        crops=crops.path,
        split=split.path,
        export=export.path,
        out=evaluation.path,
        registered_name=registered_name,
        target_precision=target_precision,
        recall_floor=recall_floor,
    )
    scores = json.loads((Path(evaluation.path) / layout.METRICS_FILE).read_text())
    result = scores["model"]
    for key in ("top1", "top3", "macro_f1", "weighted_f1"):
        metrics.log_metric(f"test_{key}", round(result[key], 4))
    metrics.log_metric("test_ece", round(scores["calibration"]["ece"], 4))
    confusion.log_confusion_matrix(result["labels"], result["confusion_matrix"])
    shutil.copyfile(Path(evaluation.path) / layout.SUMMARY_FILE, summary.path)
    shutil.copyfile(Path(evaluation.path) / layout.HTML_REPORT_FILE, report.path)
