"""Animl export -> images -> ground-truth boxes -> crops -> location split -> training -> evaluation -> registry.

Read top to bottom: each line is one stage, fed by the artifacts of the stages before it. Every parameter
shows in the Kubeflow UI; secrets (S3 and MLflow credentials) never do: the components read them from the
environment.
"""

from pathlib import Path

from animl_retrain.components.cct_to_md import cct_to_md_op
from animl_retrain.components.crop import crop_op
from animl_retrain.components.download import download_op
from animl_retrain.components.evaluate import evaluate_op
from animl_retrain.components.export import export_op
from animl_retrain.components.register import register_op
from animl_retrain.components.split import split_op
from animl_retrain.components.train import train_op
from kfp import compiler, dsl

PIPELINE_NAME = "animl-classifier-retraining"
COMPILED = Path(__file__).with_name("retrain.yaml")


@dsl.pipeline(name=PIPELINE_NAME, description="Retrain Animl's species classifier from human-validated labels.")
def retrain_pipeline(
    export_uri: str,
    images_uri: str,
    label_spec: str,
    model_name: str = "animl-classifier",
    unmapped_labels: str = "drop",
    only_validated: bool = True,
    image_size: int = 224,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    min_locs: int = 3,
    split_trials: int = 10000,
    frozen_test_uri: str = "",
    new_test_set: bool = False,
    seed: int = 0,
    arch: str = "efficientnet_b0",
    weights: str = "",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.001,
    optimizer: str = "adamw",
    lr_schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    balance: str = "loss",
    augmentation: str = "camera-trap",
    monitor: str = "val_macro_f1",
    patience: int = 5,
    checkpoint_uri: str = "",
    target_precision: float = 0.95,
    experiment: str = "animl-classifier",
):
    """Animl's classifier retraining pipeline.

    Args:
        export_uri: Animl COCO export, s3://bucket/key.json (or a path on the node).
        images_uri: the bucket holding the full-size images, e.g. s3://animl-images-serving-prod.
        label_spec: label spec as inline JSON or an s3:// URI: output class -> Animl label names.
        model_name: registered model name in MLflow.
        unmapped_labels: 'drop' or 'other': what happens to Animl labels the spec does not list.
        only_validated: keep only annotations a person validated.
        image_size: crop and model input size in pixels.
        val_frac: share of each class for validation.
        test_frac: share of each class for the test set.
        min_locs: drop classes seen at fewer locations.
        split_trials: random location assignments to score.
        frozen_test_uri: s3:// URI of the frozen test set (the first run writes it, later runs reuse it).
        new_test_set: draw a new test set and overwrite the frozen one.
        seed: random seed for the split and training.
        arch: backbone (torchvision's, or efficientnet_lite0).
        weights: initial weights: '' (random), 'imagenet', or an s3:// URI of a state dict.
        epochs: maximum training epochs.
        batch_size: images per step.
        lr: peak learning rate.
        optimizer: 'adamw' or 'sgd' (with momentum).
        lr_schedule: 'cosine', 'step' or 'constant'.
        warmup_epochs: linear learning-rate warm-up, in epochs.
        balance: class imbalance treatment: 'loss', 'sampler' or 'none'.
        augmentation: 'camera-trap' or 'none'.
        monitor: early-stopping metric: 'val_macro_f1', 'val_top1' or 'val_loss'.
        patience: early-stopping patience in epochs.
        checkpoint_uri: s3:// prefix for resume checkpoints; the run id is appended, so a retried (preempted)
            train task resumes where it stopped.
        target_precision: precision each invasive class's confidence threshold must reach on the test set.
        experiment: MLflow experiment name.
    """
    export = export_op(
        source=export_uri, label_spec=label_spec, unmapped=unmapped_labels, only_validated=only_validated
    ).set_display_name("export")
    images = download_op(export=export.outputs["export"], images_uri=images_uri).set_display_name("download")
    ground_truth = cct_to_md_op(export=export.outputs["export"], images=images.outputs["images"]).set_display_name(
        "cct-to-md"
    )
    crops = crop_op(
        images=images.outputs["images"],
        ground_truth=ground_truth.outputs["ground_truth"],
        crop_size=image_size,
    ).set_display_name("crop")
    split = split_op(
        crops=crops.outputs["crops"],
        val_frac=val_frac,
        test_frac=test_frac,
        min_locs=min_locs,
        trials=split_trials,
        seed=seed,
        frozen_test_uri=frozen_test_uri,
        new_test_set=new_test_set,
    ).set_display_name("split")
    model = train_op(
        crops=crops.outputs["crops"],
        split=split.outputs["split"],
        arch=arch,
        weights=weights,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        warmup_epochs=warmup_epochs,
        balance=balance,
        augmentation=augmentation,
        monitor=monitor,
        patience=patience,
        seed=seed,
        checkpoint_uri=checkpoint_uri,
        experiment=experiment,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("train")
    model.set_retry(num_retries=3, backoff_duration="30s")  # a preempted spot node: resume from the checkpoint
    evaluation = evaluate_op(
        model=model.outputs["model"],
        crops=crops.outputs["crops"],
        split=split.outputs["split"],
        export=export.outputs["export"],
        registered_name=model_name,
        target_precision=target_precision,
    ).set_display_name("evaluate")
    register_op(
        model=model.outputs["model"],
        evaluation=evaluation.outputs["evaluation"],
        export=export.outputs["export"],
        name=model_name,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("register")


def compile_pipeline(path: Path = COMPILED) -> Path:
    """Compile the pipeline to KFP IR YAML at ``path``."""
    compiler.Compiler().compile(retrain_pipeline, package_path=str(path))
    return path
